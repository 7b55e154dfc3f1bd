// The test page around docs/frontend.rst's Vue example (dashboard-vue.ts).
import { createApp, defineComponent, h, ref } from "vue";
import websocketService from "smapws-client";
import { Dashboard } from "./dashboard-vue";

// The hub under test instead of the example's production URL.
const hub = new URLSearchParams(location.search).get("hub");
websocketService.configure({ url: `ws://127.0.0.1:${hub}/ws` });

const App = defineComponent({
  setup() {
    const shown = ref(true);
    window.mount = () => {
      shown.value = true;
    };
    window.unmount = () => {
      shown.value = false;
    };
    return () => (shown.value ? h(Dashboard) : h("p", { id: "unmounted" }, "unmounted"));
  },
});

window.service = websocketService;
createApp(App).mount("#root");
