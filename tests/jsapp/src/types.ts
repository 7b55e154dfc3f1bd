// Type-checked only (tsc --strict): the declarations are precise enough
// that each @ts-expect-error line below is an error (tsc fails otherwise).
import websocketService, {
  type AlertPayload,
  type ConnectionState,
  type Message,
  type NotificationPayload,
  type ProjectCompletedPayload,
  type ProjectProgressPayload,
  type ResyncPayload,
  type StateEvent,
  CloseCode,
  State,
  WebSocketService,
  backoffDelay,
} from "smapws-client";
import { INITIAL_PROGRESS, type ProjectProgress, useProjectProgress } from "smapws-client/react";
import { type UseWebSocket, useWebSocket } from "smapws-client/vue";

const service: WebSocketService = websocketService;
const custom = new WebSocketService({
  url: "wss://websocket.tantai.dev/ws",
  onTokenExpired: () => fetch("/api/auth/refresh", { method: "POST", credentials: "include" }),
  minDelay: 500,
  maxDelay: 20000,
  stableAfter: 5000,
  dedupe: 1000,
  tokenRefreshEvery: 60000,
  WebSocket,
});
custom.configure({ minDelay: 250 }).connect();

service.on("progress", (p: ProjectProgressPayload) => {
  const percent: number = p.progress_percent;
  const id: string = p.project_id;
  const counts: number[] = [p.total, p.done, p.errors];
  return [percent, id, counts];
});
service.on("completed", (p: ProjectCompletedPayload) => p.status === "DONE" || p.status === "FAILED");
service.on("notification", (n: NotificationPayload) => `${n.title}: ${n.message} (${n.level})`);
service.on("alert", (a: AlertPayload) => `${a.title}: ${a.message} (${a.severity})`);
service.on("resync", (r: ResyncPayload) => [r.reason, r.down_s ?? 0]);
service.on("state", (s: StateEvent) => {
  const state: ConnectionState = s.state;
  return [state, s.code, s.delay, s.attempt, s.resumed, s.refreshing];
});
const off: () => void = service.on("message", (m: Message) => {
  if (m.type === "project_progress") {
    const done: number = m.payload.done;
    return done;
  }
  if (m.type === "alert") {
    const severity: string = m.payload.severity;
    return severity;
  }
  return m.id ?? m.timestamp;
});
off();
const codes: number[] = [CloseCode.POLICY, CloseCode.TOO_BIG];
const idle: ConnectionState = State.IDLE;
const delay: number = backoffDelay(3, 500, 20000, Math.random);
const release: () => void = service.retain();
release();
const count: number = service.listenerCount("progress") + service.listenerCount();

const initial: Readonly<ProjectProgress> = INITIAL_PROGRESS;
export function useTyped(): [ProjectProgress, UseWebSocket] {
  return [useProjectProgress("proj_xyz"), useWebSocket({ limit: 10 })];
}

// @ts-expect-error: not an event of the client
service.on("progres", () => {});
// @ts-expect-error: a progress payload has no title string
service.on("progress", (p) => p.title.toUpperCase());
// @ts-expect-error: a notification's title is a string
service.on("notification", (n) => n.title * 2);
// @ts-expect-error: not an option
new WebSocketService({ minDelai: 500 });
// @ts-expect-error: minDelay is a number of ms
new WebSocketService({ minDelay: "500" });
// @ts-expect-error: the state is one of five strings
const wrong: ConnectionState = "connected";
// @ts-expect-error: project ids are strings
useProjectProgress(42);
// @ts-expect-error: the seed's progressPercent, not progress_percent
useProjectProgress("p").progress_percent;

export { codes, count, custom, delay, idle, initial, wrong };
