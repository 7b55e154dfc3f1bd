// The seed's Vue composable (useWebSocket) on smapws-client/vue.
import { createApp, defineComponent, h, ref } from "vue";
import websocketService from "smapws-client";
import { useWebSocket } from "smapws-client/vue";

const hub = new URLSearchParams(location.search).get("hub");
websocketService.configure({ url: `ws://127.0.0.1:${hub}/ws` });

const Panel = defineComponent({
  setup() {
    const { isConnected, state, progress, notifications } = useWebSocket();
    return () =>
      h("div", [
        h("p", { id: "state" }, state.value),
        h("p", { id: "connected" }, String(isConnected.value)),
        h(
          "ul",
          Object.entries(progress.value).map(([id, p]) =>
            h(
              "li",
              {
                class: "project",
                "data-project": id,
                "data-status": p.status,
                "data-done": p.done,
                "data-total": p.total,
                "data-errors": p.errors,
                "data-percent": p.progress_percent,
              },
              `${id}: ${p.status} ${p.done}/${p.total}`,
            ),
          ),
        ),
        h("ul", { id: "notifications" }, notifications.value.map((n) => h("li", n.title))),
      ]);
  },
});

const App = defineComponent({
  setup() {
    const shown = ref(true);
    window.mount = () => {
      shown.value = true;
    };
    window.unmount = () => {
      shown.value = false;
    };
    return () => (shown.value ? h(Panel) : h("p", { id: "unmounted" }, "unmounted"));
  },
});

window.service = websocketService;
createApp(App).mount("#root");
