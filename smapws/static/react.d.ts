// Types of smapws-client/react.
import type { ConnectionState, NotificationPayload, ProjectStatus, WebSocketService } from "./smapws-client.js";

/** The seed's progress shape. */
export interface ProjectProgress {
  status: ProjectStatus;
  total: number;
  done: number;
  errors: number;
  progressPercent: number;
}
export declare const INITIAL_PROGRESS: Readonly<ProjectProgress>;

export declare function useProjectProgress(projectId: string, service?: WebSocketService): ProjectProgress;
export declare function useNotifications(options?: {
  limit?: number;
  service?: WebSocketService;
}): NotificationPayload[];
export declare function useConnectionState(service?: WebSocketService): ConnectionState;
