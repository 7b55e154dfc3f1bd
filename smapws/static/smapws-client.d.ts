// Types of smapws-client.js (the browser client of the smapws hub).

/** Close codes the hub sends (docs/reference/close-codes.rst). */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  ABNORMAL: 1006;
  POLICY: 1008;
  TOO_BIG: 1009;
  INTERNAL: 1011;
  TRY_AGAIN_LATER: 1013;
}>;

/** Connection states, as the "state" event reports them. */
export declare const State: Readonly<{
  IDLE: "idle";
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;
export type ConnectionState = (typeof State)[keyof typeof State];

/** The seed's project statuses (any other string passes through). */
export type ProjectStatus =
  | "INITIALIZING"
  | "CRAWLING"
  | "PROCESSING"
  | "DONE"
  | "FAILED"
  | (string & {});

/** `project_progress` (event "progress"). */
export interface ProjectProgressPayload {
  project_id: string;
  status: ProjectStatus;
  total: number;
  done: number;
  errors: number;
  progress_percent: number;
  [extra: string]: unknown;
}
/** `project_completed` (event "completed"): status DONE or FAILED. */
export interface ProjectCompletedPayload extends ProjectProgressPayload {}
/** `notification` (event "notification"). */
export interface NotificationPayload {
  title: string;
  message: string;
  level: "info" | "success" | "warning" | "error" | (string & {});
  [extra: string]: unknown;
}
/** `alert` (event "alert"). */
export interface AlertPayload {
  title: string;
  message: string;
  severity: "info" | "warning" | "critical" | "error" | (string & {});
  [extra: string]: unknown;
}
/** `resync` (event "resync"): something may be missing; refetch the state. */
export interface ResyncPayload {
  reason: "history_gap" | "subscriber_reconnected" | (string & {});
  down_s?: number;
  [extra: string]: unknown;
}

interface Envelope<T extends string, P> {
  type: T;
  payload: P;
  /** 16 lower-case hex characters; what `?since=` resumes after. */
  id?: string;
  /** RFC 3339 UTC with milliseconds, added by the hub. */
  timestamp?: string;
}
/** A whole message as the hub sends it (event "message"). */
export type Message =
  | Envelope<"project_progress", ProjectProgressPayload>
  | Envelope<"project_completed", ProjectCompletedPayload>
  | Envelope<"notification", NotificationPayload>
  | Envelope<"alert", AlertPayload>
  | Envelope<"resync", ResyncPayload>;

/** The "state" event. */
export interface StateEvent {
  state: ConnectionState;
  /** The close code that ended the last connection. */
  code?: number;
  /** ms until the next attempt (state "reconnecting"). */
  delay?: number;
  attempt?: number;
  /** On "open": the connection resumed with `?since=`. */
  resumed?: boolean;
  /** On "reconnecting": onTokenExpired() is being awaited. */
  refreshing?: boolean;
}

/** Each event and what its listeners receive. */
export interface EventMap {
  progress: ProjectProgressPayload;
  completed: ProjectCompletedPayload;
  notification: NotificationPayload;
  alert: AlertPayload;
  resync: ResyncPayload;
  state: StateEvent;
  message: Message;
}
export type EventName = keyof EventMap;
export type Listener<E extends EventName> = (data: EventMap[E]) => void;

export interface WebSocketServiceOptions {
  /** The hub's WebSocket URL (default: /ws on the page's host, wss: under https:). */
  url?: string;
  /** Refresh the access_token cookie: awaited after a 1008 close, and at most
   * once a minute while connections fail before they open. */
  onTokenExpired?: () => unknown | Promise<unknown>;
  /** First backoff cap, ms (500). */
  minDelay?: number;
  /** Largest backoff cap, ms (20000). */
  maxDelay?: number;
  /** ms open before the backoff starts over (5000). */
  stableAfter?: number;
  /** Message ids remembered to drop one delivered twice (1000). */
  dedupe?: number;
  /** ms between onTokenExpired calls while refused (60000). */
  tokenRefreshEvery?: number;
  /** The WebSocket class to use (default: the global one). */
  WebSocket?: typeof WebSocket;
}

/** Full-jitter exponential backoff: a delay in [0, min(maxDelay, minDelay * 2^attempt)) ms. */
export declare function backoffDelay(
  attempt: number,
  minDelay?: number,
  maxDelay?: number,
  random?: () => number,
): number;

export declare class WebSocketService {
  constructor(options?: WebSocketServiceOptions);
  readonly options: Readonly<Required<Omit<WebSocketServiceOptions, "url" | "onTokenExpired" | "WebSocket">>> &
    WebSocketServiceOptions;
  /** The state now (the last "state" event's). */
  readonly state: ConnectionState;
  /** Whether a connection is open now. */
  readonly connected: boolean;
  /** The WebSocket URL the next connection uses (without `since`). */
  readonly url: string;
  /** Change options; for the default instance, before connect(). */
  configure(options: WebSocketServiceOptions): this;
  /** Call `callback` on each `event`; returns a function that removes it. */
  on<E extends EventName>(event: E, callback: Listener<E>): () => void;
  off<E extends EventName>(event: E, callback: Listener<E>): void;
  /** How many listeners `event` has (all events without one). */
  listenerCount(event?: EventName): number;
  /** Connect, and stay connected until disconnect(). Idempotent. */
  connect(): void;
  /** Close and stop reconnecting; connect() starts again, resuming. */
  disconnect(): void;
  /** Skip the backoff wait. */
  reconnectNow(): void;
  /** Keep the service connected until the returned release is called (the
   * first retain connects; the last release closes what retain opened). */
  retain(): () => void;
}

/** The ready instance, as the seed's `export default new WebSocketService()`. */
declare const websocketService: WebSocketService;
export default websocketService;
