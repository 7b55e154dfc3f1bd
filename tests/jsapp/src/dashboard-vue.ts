import { defineComponent } from "vue";
import websocketService from "smapws-client";
import { useWebSocket } from "smapws-client/vue";

websocketService.configure({
  url: "wss://websocket.tantai.dev/ws", // default: /ws on the page's host
  onTokenExpired: () => fetch("/api/auth/refresh", { method: "POST", credentials: "include" }),
});

export const Dashboard = defineComponent({
  setup() {
    // The seed's { isConnected, progress }, plus state and notifications.
    const { isConnected, state, progress, notifications } = useWebSocket();
    return { isConnected, state, progress, notifications };
  },
  template: `
    <div>
      <p id="state">{{ state }}</p>
      <p id="connected">{{ isConnected }}</p>
      <ul>
        <li v-for="(p, id) in progress" :key="id" class="project" :data-project="id"
            :data-status="p.status" :data-done="p.done" :data-total="p.total"
            :data-errors="p.errors" :data-percent="p.progress_percent">
          {{ id }}: {{ p.status }} {{ p.done }}/{{ p.total }}
          <progress max="100" :value="p.progress_percent"></progress>
        </li>
      </ul>
      <ul id="notifications"><li v-for="(n, i) in notifications" :key="i">{{ n.title }}</li></ul>
    </div>`,
});
