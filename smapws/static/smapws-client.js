/**
 * smapws-client.js: the browser client of the smapws notification hub.
 *
 * One dependency-free ES module. The hub serves it at GET /smapws-client.js;
 * bundlers take it from the package beside it (package.json). It keeps the
 * interface of the integration guide's WebSocketService (on, off, connect,
 * disconnect; events progress, completed, notification) and adds:
 *
 *   - events "alert", "resync", "state" and "message" (every message);
 *   - reconnection that never gives up: full-jitter exponential backoff
 *     (0.5 s doubling to 20 s), at once on the browser's "online" event,
 *     never after disconnect(), never in a loop on 1009;
 *   - onTokenExpired(): awaited on a 1008 close (the token expired) before
 *     reconnecting, so that the page can refresh its access_token cookie;
 *   - recovery: it reconnects with ?since=<last id>, the hub replays what was
 *     missed, and each message is delivered once, in order.
 *
 *   import websocketService from "smapws-client";      // or "/smapws-client.js"
 *   websocketService.configure({ onTokenExpired: () => fetch("/auth/refresh", { method: "POST" }) });
 *   websocketService.on("progress", (p) => console.log(p.project_id, p.progress_percent));
 *   websocketService.on("resync", () => refetchEverything());
 *   websocketService.connect();
 *
 * The default export is a ready instance, as the seed's module is (`export
 * default new WebSocketService()`); `new WebSocketService(options)` makes
 * others. Nothing touches `location` or `WebSocket` before connect(), so the
 * module imports anywhere (server-side rendering, tests in Node).
 */

/** Close codes the hub sends (docs/reference/close-codes.rst). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // the hub drains (deploy): reconnect, elsewhere
  ABNORMAL: 1006, // no close frame: network, refused upgrade, write timeout
  POLICY: 1008, // the token expired: refresh it, reconnect
  TOO_BIG: 1009, // we sent a frame too large: do not reconnect in a loop
  INTERNAL: 1011, // no pong in time
  TRY_AGAIN_LATER: 1013, // our queue overflowed on the hub: reconnect later
});

/** Connection states, as the "state" event reports them. */
export const State = Object.freeze({
  IDLE: "idle", // never connected
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting", // waiting before the next attempt
  CLOSED: "closed", // disconnect() was called, or a 1009 stopped us
});

const DEFAULTS = Object.freeze({
  minDelay: 500, // ms: the first backoff cap
  maxDelay: 20000, // ms: the largest backoff cap
  stableAfter: 5000, // ms open before the backoff starts over
  dedupe: 1000, // ids remembered to drop a message delivered twice
  tokenRefreshEvery: 60000, // ms between onTokenExpired calls while refused
});

/**
 * Full-jitter exponential backoff: a delay drawn uniformly from
 * [0, min(maxDelay, minDelay * 2^attempt)) milliseconds. Clients that lost
 * their connection together spread their reconnects over the whole window
 * instead of coming back as one wave.
 */
export function backoffDelay(attempt, minDelay = DEFAULTS.minDelay, maxDelay = DEFAULTS.maxDelay, random = Math.random) {
  const cap = Math.min(maxDelay, minDelay * 2 ** Math.min(attempt, 30));
  return random() * cap;
}

/** The hub's /ws on the page's own host: wss: under https:. */
function defaultUrl() {
  const loc = globalThis.location;
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

/** A ws(s): URL from `url`, which may be relative to the page. */
function socketUrl(url) {
  const base = globalThis.location ? globalThis.location.href : undefined;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u;
}

const EVENT_OF_TYPE = {
  project_progress: "progress",
  project_completed: "completed",
  notification: "notification",
  alert: "alert",
};

export class WebSocketService {
  /**
   * @param {object} [options]
   * @param {string} [options.url] the hub's WebSocket URL (default: /ws on the page's host)
   * @param {() => Promise<unknown>} [options.onTokenExpired] refresh the access_token
   *   cookie; awaited after a 1008 close, and at most once a minute while
   *   connections keep failing before they open, before reconnecting
   * @param {number} [options.minDelay] first backoff cap in ms (500)
   * @param {number} [options.maxDelay] largest backoff cap in ms (20000)
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class to use
   */
  constructor(options = {}) {
    this.options = { ...DEFAULTS };
    this.configure(options);
    this.retained = 0; // retain() calls not yet released
    this.retainedConnect = false; // whether retain() called connect()
    this.state = State.IDLE;
    this.listeners = new Map();
    this.ws = null;
    this.wanted = false;
    this.attempt = 0;
    this.timer = null;
    this.stableTimer = null;
    this.refusals = 0; // attempts in a row that closed before opening
    this.lastRefresh = -Infinity;
    this.lastId = null; // the id of the last message delivered
    this.lastIdAt = 0; // when (Date.now())
    this.seen = new Set();
    this.seenOrder = [];
    this.dropSeen = false; // on a resumed connection, until a new id arrives
    this.onOnline = () => this.reconnectNow();
  }

  /**
   * Change options (those of the constructor); a new `url` applies from
   * the next connection. For the default instance, before connect().
   */
  configure(options = {}) {
    for (const [key, value] of Object.entries(options)) {
      if (value !== undefined) this.options[key] = value;
    }
    return this;
  }

  /** The WebSocket URL the next connection uses (without `since`). */
  get url() {
    return this.options.url ?? defaultUrl();
  }

  /**
   * Keep the service connected while something needs it (a mounted
   * component): the first retain() connects, unless connect() was called
   * already; when the last is released, the connection retain() made is
   * closed. The close waits a tick, so that an unmount followed at once by
   * a mount (React StrictMode, a re-render with a new key) keeps the same
   * connection. Returns the release function (idempotent).
   */
  retain() {
    this.retained += 1;
    if (!this.wanted) {
      this.connect();
      this.retainedConnect = true;
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.retained -= 1;
      setTimeout(() => {
        if (this.retained === 0 && this.retainedConnect) {
          this.retainedConnect = false;
          this.disconnect();
        }
      }, 0);
    };
  }

  /** How many listeners are registered for `event` (all events without one). */
  listenerCount(event) {
    if (event !== undefined) return (this.listeners.get(event) || []).length;
    let n = 0;
    for (const callbacks of this.listeners.values()) n += callbacks.length;
    return n;
  }

  /** Call `callback` on each `event`. Returns a function that removes it. */
  on(event, callback) {
    if (!this.listeners.has(event)) this.listeners.set(event, []);
    this.listeners.get(event).push(callback);
    return () => this.off(event, callback);
  }

  off(event, callback) {
    const callbacks = this.listeners.get(event);
    if (!callbacks) return;
    const i = callbacks.indexOf(callback);
    if (i >= 0) callbacks.splice(i, 1);
  }

  emit(event, data) {
    for (const cb of [...(this.listeners.get(event) || [])]) {
      try {
        cb(data);
      } catch (err) {
        console.error(`smapws: a "${event}" listener threw`, err);
      }
    }
  }

  /** Connect, and stay connected until disconnect(). Idempotent. */
  connect() {
    this.retainedConnect = false; // asked for: released components leave it open
    if (this.wanted) return;
    this.wanted = true;
    this.attempt = 0;
    this.refusals = 0;
    globalThis.addEventListener?.("online", this.onOnline);
    this.open();
  }

  /** Close and stop reconnecting. connect() starts again (resuming). */
  disconnect() {
    this.wanted = false;
    this.retainedConnect = false;
    globalThis.removeEventListener?.("online", this.onOnline);
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(CloseCode.NORMAL);
    this.setState(State.CLOSED, { code: CloseCode.NORMAL });
  }

  /** Whether a connection is open now. */
  get connected() {
    return this.state === State.OPEN;
  }

  /** Skip the backoff wait (the browser is back online). */
  reconnectNow() {
    if (!this.wanted || this.ws || this.state !== State.RECONNECTING) return;
    this.clearTimers();
    this.open();
  }

  // -- internals ------------------------------------------------------------

  setState(state, detail = {}) {
    this.state = state;
    this.emit("state", { state, ...detail });
  }

  clearTimers() {
    clearTimeout(this.timer);
    clearTimeout(this.stableTimer);
    this.timer = this.stableTimer = null;
  }

  resumeUrl() {
    const u = socketUrl(this.url);
    if (this.lastId) {
      u.searchParams.set("since", this.lastId);
      u.searchParams.set("since_age", String(Math.max(0, Date.now() - this.lastIdAt) / 1000));
    }
    return u.toString();
  }

  open() {
    const resuming = this.lastId !== null;
    let ws;
    try {
      const Socket = this.options.WebSocket ?? globalThis.WebSocket;
      ws = new Socket(this.resumeUrl());
    } catch (err) {
      console.error("smapws: cannot open a WebSocket", err);
      this.retry(CloseCode.ABNORMAL, false);
      return;
    }
    this.ws = ws;
    let opened = false;
    this.setState(State.CONNECTING, { attempt: this.attempt });
    ws.onopen = () => {
      if (ws !== this.ws) return;
      opened = true;
      this.refusals = 0;
      this.dropSeen = resuming;
      this.stableTimer = setTimeout(() => {
        this.attempt = 0;
      }, this.options.stableAfter);
      this.setState(State.OPEN, { resumed: resuming });
    };
    ws.onmessage = (event) => {
      if (ws === this.ws) this.receive(event.data);
    };
    ws.onerror = () => {}; // a close event follows with the code
    ws.onclose = (event) => {
      if (ws !== this.ws) return; // disconnect() or a replaced socket
      this.ws = null;
      clearTimeout(this.stableTimer);
      this.retry(event.code, opened);
    };
  }

  async retry(code, opened) {
    if (!this.wanted) return;
    if (code === CloseCode.TOO_BIG) {
      // We sent something the hub refuses; reconnecting would repeat it.
      this.wanted = false;
      globalThis.removeEventListener?.("online", this.onOnline);
      this.setState(State.CLOSED, { code });
      return;
    }
    this.refusals = opened ? 0 : this.refusals + 1;
    // A browser does not say why an upgrade was refused (401, 403, 503 and a
    // network error all look alike): a token that expired while the page was
    // asleep is one likely cause, so refresh it now and then.
    const refused =
      this.refusals >= 2 && Date.now() - this.lastRefresh >= this.options.tokenRefreshEvery;
    if (this.options.onTokenExpired && (code === CloseCode.POLICY || refused)) {
      this.setState(State.RECONNECTING, { code, delay: 0, attempt: this.attempt, refreshing: true });
      this.lastRefresh = Date.now();
      try {
        await this.options.onTokenExpired();
      } catch (err) {
        console.error("smapws: onTokenExpired failed", err);
      }
      if (!this.wanted || this.ws) return;
      if (code === CloseCode.POLICY && this.attempt === 0) {
        // A fresh token: connect at once. (attempt is 0 only after a
        // connection that lived stableAfter: a token that keeps failing
        // goes through the backoff like anything else.)
        this.attempt = 1;
        this.open();
        return;
      }
    }
    const delay = backoffDelay(this.attempt, this.options.minDelay, this.options.maxDelay);
    this.attempt += 1;
    this.setState(State.RECONNECTING, { code, delay, attempt: this.attempt });
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.wanted && !this.ws) this.open();
    }, delay);
  }

  receive(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      console.warn("smapws: a frame that is not JSON was ignored");
      return;
    }
    if (!msg || typeof msg.type !== "string") return;
    if (msg.type === "resync") {
      // Something may have been missed: the page refetches its state, and
      // what comes next is new whatever we remember.
      this.forgetSeen();
      this.emit("resync", msg.payload || {});
      this.emit("message", msg);
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : null;
    if (id !== null) {
      if (this.dropSeen) {
        // A resumed connection may repeat what we already delivered (after
        // a hub that numbered a repeated message differently); drop those
        // until the first new message.
        if (this.seen.has(id)) return;
        this.dropSeen = false;
      }
      this.remember(id);
      this.lastId = id;
      this.lastIdAt = Date.now();
    }
    const event = EVENT_OF_TYPE[msg.type];
    if (event) this.emit(event, msg.payload);
    this.emit("message", msg);
  }

  remember(id) {
    this.seen.add(id);
    this.seenOrder.push(id);
    if (this.seenOrder.length > this.options.dedupe) this.seen.delete(this.seenOrder.shift());
  }

  forgetSeen() {
    this.seen.clear();
    this.seenOrder = [];
    this.dropSeen = false;
  }
}

/** The ready instance, as the seed's `export default new WebSocketService()`. */
const websocketService = new WebSocketService();
export default websocketService;
