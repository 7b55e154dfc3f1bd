/**
 * smapws-client/vue: the composable of the seed's composables/useWebSocket.js,
 * over a WebSocketService (by default the module's ready instance).
 *
 *   import { useWebSocket } from "smapws-client/vue";
 *   const { isConnected, progress } = useWebSocket();   // in setup()
 *
 * Call it in setup(). While the component is mounted the service stays
 * connected (retain()); on unmount its listeners are removed, and the
 * connection closes when no component needs it any more.
 */
import { onMounted, onUnmounted, ref } from "vue";
import websocketService from "./smapws-client.js";

/**
 * `isConnected` and `state` (refs), `progress` (a ref of an object: project
 * id to its last project_progress or project_completed payload, as in the
 * seed), `notifications` (a ref of the notification payloads received,
 * oldest first, at most `limit`), and the `service`.
 */
export function useWebSocket({ limit = 100, service = websocketService } = {}) {
  const state = ref(service.state);
  const isConnected = ref(service.connected);
  const progress = ref({});
  const notifications = ref([]);
  let cleanups = [];
  const onProject = (p) => {
    progress.value[p.project_id] = p;
  };
  onMounted(() => {
    cleanups = [
      service.on("state", (s) => {
        state.value = s.state;
        isConnected.value = s.state === "open";
      }),
      service.on("progress", onProject),
      service.on("completed", onProject),
      service.on("notification", (n) => {
        notifications.value = [...notifications.value, n].slice(-limit);
      }),
      service.retain(),
    ];
    state.value = service.state;
    isConnected.value = service.connected;
  });
  onUnmounted(() => {
    for (const cleanup of cleanups.splice(0)) cleanup();
  });
  return { isConnected, state, progress, notifications, service };
}
