import websocketService from "smapws-client";
import { useConnectionState, useNotifications, useProjectProgress } from "smapws-client/react";

websocketService.configure({
  url: "wss://websocket.tantai.dev/ws", // default: /ws on the page's host
  onTokenExpired: () => fetch("/api/auth/refresh", { method: "POST", credentials: "include" }),
});

function Project({ id }: { id: string }) {
  const { status, total, done, errors, progressPercent } = useProjectProgress(id);
  return (
    <li className="project" data-project={id} data-status={status} data-done={done}
        data-total={total} data-errors={errors} data-percent={progressPercent}>
      {id}: {status} {done}/{total} <progress max={100} value={progressPercent} />
    </li>
  );
}

export function Dashboard({ projectIds }: { projectIds: string[] }) {
  const state = useConnectionState(); // "open", "reconnecting", ...
  const notifications = useNotifications();
  return (
    <div>
      <p id="state">{state}</p>
      <ul>{projectIds.map((id) => <Project key={id} id={id} />)}</ul>
      <ul id="notifications">{notifications.map((n, i) => <li key={i}>{n.title}</li>)}</ul>
    </div>
  );
}
