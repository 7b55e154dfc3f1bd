// What the pages expose to the test (tests/test_js_package.py).
import type { WebSocketService } from "smapws-client";

declare global {
  interface Window {
    service: WebSocketService;
    mount: () => void;
    unmount: () => void;
  }
}
