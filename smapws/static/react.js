/**
 * smapws-client/react: React hooks over a WebSocketService (by default the
 * module's ready instance), replacing the seed's hooks/useProjectProgress.js.
 *
 *   import { useProjectProgress, useNotifications, useConnectionState } from "smapws-client/react";
 *
 * Each hook keeps the service connected while it is mounted (retain()) and
 * removes its listeners in its cleanup, so StrictMode's mount, unmount,
 * mount leaves one listener per hook and one connection.
 */
import { useEffect, useState, useSyncExternalStore } from "react";
import websocketService from "./smapws-client.js";

/** What useProjectProgress returns before the first message (the seed's). */
export const INITIAL_PROGRESS = Object.freeze({
  status: "INITIALIZING",
  total: 0,
  done: 0,
  errors: 0,
  progressPercent: 0,
});

function progressOf(payload, percent) {
  return {
    status: payload.status,
    total: payload.total,
    done: payload.done,
    errors: payload.errors,
    progressPercent: percent,
  };
}

/**
 * The progress of one project, as the seed's hook has it: `{status, total,
 * done, errors, progressPercent}`, `progressPercent` 100 once
 * `project_completed` came. Back to INITIAL_PROGRESS when `projectId` changes.
 */
export function useProjectProgress(projectId, service = websocketService) {
  const [seen, setSeen] = useState({ projectId, progress: INITIAL_PROGRESS });
  useEffect(() => {
    const offProgress = service.on("progress", (p) => {
      if (p.project_id === projectId) {
        setSeen({ projectId, progress: progressOf(p, p.progress_percent) });
      }
    });
    const offCompleted = service.on("completed", (p) => {
      if (p.project_id === projectId) setSeen({ projectId, progress: progressOf(p, 100) });
    });
    const release = service.retain();
    return () => {
      offProgress();
      offCompleted();
      release();
    };
  }, [projectId, service]);
  return seen.projectId === projectId ? seen.progress : INITIAL_PROGRESS;
}

/**
 * The `notification` payloads received while mounted, oldest first, at most
 * `limit` (the oldest go first).
 */
export function useNotifications({ limit = 100, service = websocketService } = {}) {
  const [notifications, setNotifications] = useState([]);
  useEffect(() => {
    const off = service.on("notification", (n) => {
      setNotifications((list) => [...list, n].slice(-limit));
    });
    const release = service.retain();
    return () => {
      off();
      release();
    };
  }, [limit, service]);
  return notifications;
}

/** The connection's state: "idle", "connecting", "open", "reconnecting" or "closed". */
export function useConnectionState(service = websocketService) {
  useEffect(() => service.retain(), [service]);
  return useSyncExternalStore(
    (onChange) => service.on("state", onChange),
    () => service.state,
    () => service.state,
  );
}
