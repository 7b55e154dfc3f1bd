// Types of smapws-client/vue.
import type { Ref } from "vue";
import type {
  ConnectionState,
  NotificationPayload,
  ProjectCompletedPayload,
  ProjectProgressPayload,
  WebSocketService,
} from "./smapws-client.js";

export interface UseWebSocket {
  isConnected: Ref<boolean>;
  state: Ref<ConnectionState>;
  /** Project id to its last project_progress or project_completed payload. */
  progress: Ref<Record<string, ProjectProgressPayload | ProjectCompletedPayload>>;
  notifications: Ref<NotificationPayload[]>;
  service: WebSocketService;
}

export declare function useWebSocket(options?: {
  limit?: number;
  service?: WebSocketService;
}): UseWebSocket;
