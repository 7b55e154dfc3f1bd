// The seed's React usage on smapws-client/react, in StrictMode (a
// development build: effects mount, unmount and mount again).
import { StrictMode, useState } from "react";
import { createRoot } from "react-dom/client";
import websocketService from "smapws-client";
import { useConnectionState, useNotifications, useProjectProgress } from "smapws-client/react";

const hub = new URLSearchParams(location.search).get("hub");
websocketService.configure({ url: `ws://127.0.0.1:${hub}/ws` });

function Project({ id }: { id: string }) {
  const progress = useProjectProgress(id);
  return (
    <li
      className="project"
      data-project={id}
      data-status={progress.status}
      data-done={progress.done}
      data-total={progress.total}
      data-errors={progress.errors}
      data-percent={progress.progressPercent}
    >
      {id}: {progress.status} {progress.done}/{progress.total}
    </li>
  );
}

function Panel() {
  const state = useConnectionState();
  const notifications = useNotifications();
  return (
    <div>
      <p id="state">{state}</p>
      <ul>
        <Project id="p1" />
        <Project id="p2" />
      </ul>
      <ul id="notifications">
        {notifications.map((n, i) => (
          <li key={i}>{n.title}</li>
        ))}
      </ul>
    </div>
  );
}

function App() {
  const [shown, setShown] = useState(true);
  window.mount = () => setShown(true);
  window.unmount = () => setShown(false);
  return shown ? <Panel /> : <p id="unmounted">unmounted</p>;
}

window.service = websocketService;
createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
