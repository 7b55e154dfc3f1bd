// The test page around docs/frontend.rst's React example (dashboard-react.tsx), in
// StrictMode (a development build: effects mount, unmount and mount again).
import { StrictMode, useState } from "react";
import { createRoot } from "react-dom/client";
import websocketService from "smapws-client";
import { Dashboard } from "./dashboard-react";

// The hub under test instead of the example's production URL.
const hub = new URLSearchParams(location.search).get("hub");
websocketService.configure({ url: `ws://127.0.0.1:${hub}/ws` });

function App() {
  const [shown, setShown] = useState(true);
  window.mount = () => setShown(true);
  window.unmount = () => setShown(false);
  return shown ? <Dashboard projectIds={["p1", "p2"]} /> : <p id="unmounted">unmounted</p>;
}

window.service = websocketService;
createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
