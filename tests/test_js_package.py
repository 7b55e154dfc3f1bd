"""The ``smapws-client`` npm package as a frontend team installs it.

``npm pack`` builds the tarball from ``smapws/static/``; a test app (tests/jsapp,
its third-party packages installed by ``bash .ci/run`` from the committed
lockfile: real React, Vue, TypeScript and esbuild from npm) installs it,
type-checks with ``tsc --strict``, bundles with esbuild, and runs the React
hooks (in StrictMode, a development build) and the Vue composable in
Debian's Chromium against a real hub on a real Redis.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smapws import __version__
from smapws._io import assets

from .browser import ROOT, HubProcess, chromium, health, metric, wait_for
from .conftest import RedisServer, doc_block, token

APP = ROOT / "tests" / "jsapp"
PACKAGE = ROOT / "smapws" / "static"
#: What the tarball holds: the module, the hooks, the composable, their types.
FILES = {
    "package.json",
    "smapws-client.js",
    "smapws-client.d.ts",
    "react.js",
    "react.d.ts",
    "vue.js",
    "vue.d.ts",
}


def npm(*args: str, cwd: Path) -> str:
    """``npm <args>`` in ``cwd``; fails the test with npm's output on an error."""
    if shutil.which("npm") is None:
        pytest.fail("npm is missing: run `bash .ci/run` (it installs Debian's npm)")
    proc = subprocess.run(
        ["npm", "--no-audit", "--no-fund", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"npm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack")
    (packed,) = json.loads(npm("pack", "--json", "--pack-destination", str(out), cwd=PACKAGE))
    return out / packed["filename"]


@pytest.fixture(scope="module")
def app(tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test app with the tarball installed in it, built."""
    if not (APP / "node_modules" / ".bin" / "tsc").exists():
        pytest.fail("tests/jsapp/node_modules is missing: run `bash .ci/run` (npm ci there)")
    where = tmp_path_factory.mktemp("app") / "app"
    shutil.copytree(
        APP,
        where,
        symlinks=True,
        ignore=lambda d, names: ["dist"] if Path(d) == APP else [],  # a stale build
    )
    # --offline: the app's own packages are all there already (from the
    # lockfile); only the local tarball is added.
    npm("install", "--no-save", "--offline", str(tarball), cwd=where)
    npm("run", "--silent", "build", cwd=where)
    return where


@pytest.mark.parametrize(
    ("paragraph", "source"),
    [("A React component", "dashboard-react.tsx"), ("The same in Vue", "dashboard-vue.ts")],
)
def test_the_documented_examples_are_the_ones_that_run(paragraph: str, source: str) -> None:
    assert doc_block("docs/frontend.rst", paragraph) == (APP / "src" / source).read_text()


def test_the_tarball_holds_the_module_hooks_composable_and_types(tarball: Path) -> None:
    with tarfile.open(tarball) as tar:
        names = {m.name.removeprefix("package/") for m in tar.getmembers()}
        assert names == FILES, "no demo page, nothing else"
        packed_js = tar.extractfile("package/smapws-client.js").read()  # type: ignore[union-attr]
        package = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
    # The file the hub serves from the installed Python package is the same.
    assert packed_js == assets.read(assets.CLIENT_JS)
    assert package["version"] == __version__
    assert package["type"] == "module"
    assert package["types"] == "./smapws-client.d.ts"
    for subpath, name in ((".", "smapws-client"), ("./react", "react"), ("./vue", "vue")):
        assert package["exports"][subpath] == {"types": f"./{name}.d.ts", "default": f"./{name}.js"}
    assert set(package["peerDependencies"]) == {"react", "vue"}
    assert "dependencies" not in package


def test_the_default_export_is_a_ready_instance_that_imports_under_node(app: Path) -> None:
    # As the seed's module: `import websocketService from ...` then
    # websocketService.on(...). Node has no `location` (server-side
    # rendering): importing must not touch it, nor WebSocket.
    script = (
        "import websocketService, { WebSocketService } from 'smapws-client';"
        "import { useProjectProgress, useNotifications, useConnectionState }"
        " from 'smapws-client/react';"
        "import { useWebSocket } from 'smapws-client/vue';"
        "const off = websocketService.on('progress', () => {});"
        "console.log(JSON.stringify([websocketService instanceof WebSocketService,"
        " websocketService.state, websocketService.listenerCount('progress'),"
        " typeof off, typeof useProjectProgress, typeof useNotifications,"
        " typeof useConnectionState, typeof useWebSocket]));"
    )
    proc = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        True, "idle", 1, "function", "function", "function", "function", "function",
    ]  # fmt: skip


def test_a_strict_typescript_app_type_checks_against_the_package(app: Path) -> None:
    config = json.loads((app / "tsconfig.json").read_text())
    assert config["compilerOptions"]["strict"] is True
    assert config["compilerOptions"]["skipLibCheck"] is False, "our .d.ts are checked too"
    # src/types.ts uses every option, event and payload type, and holds
    # @ts-expect-error lines that are errors only if the types are precise.
    npm("run", "--silent", "typecheck", cwd=app)
    # Without the declarations a strict app cannot import the package (TS7016).
    installed = app / "node_modules" / "smapws-client"
    hidden = [installed / name for name in ("smapws-client.d.ts", "react.d.ts", "vue.d.ts")]
    for path in hidden:
        path.rename(path.with_suffix(".hidden"))
    try:
        proc = subprocess.run(
            ["node_modules/.bin/tsc", "-p", ".", "--skipLibCheck"],
            cwd=app,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for path in hidden:
            path.with_suffix(".hidden").rename(path)
    assert proc.returncode != 0 and "TS7016" in proc.stdout, proc.stdout


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head>
<body><div id="root"></div><script type="module" src="/{name}-app.js"></script></body></html>
"""


@pytest.fixture(scope="module")
def site(app: Path) -> Iterator[str]:
    """The app's bundles and a page for each, on a dev server of its own origin."""
    dist = app / "dist"
    for name in ("react", "vue"):
        (dist / f"{name}.html").write_text(PAGE.format(name=name))
    handler = functools.partial(QuietHandler, directory=str(dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def project(page: Any, project_id: str) -> dict[str, str] | None:
    """The data-* attributes of the project's row, or None."""
    row: dict[str, str] | None = page.evaluate(
        "(id) => { const li = document.querySelector(`li[data-project='${id}']`);"
        " return li && { ...li.dataset } }",
        project_id,
    )
    return row


def shown(
    project_id: str, status: str, done: int, total: int, errors: int, percent: int
) -> dict[str, str]:
    """What :func:`project` reads from a row showing these values."""
    values = {"done": done, "total": total, "errors": errors, "percent": percent}
    return {"project": project_id, "status": status, **{k: str(v) for k, v in values.items()}}


#: Listeners a mounted app registers on the service: React, two
#: useProjectProgress (progress, completed), useNotifications, and
#: useConnectionState; Vue, the one composable's four.
LISTENERS = {"react": 6, "vue": 4}


@pytest.mark.parametrize("framework", ["react", "vue"])
def test_the_hook_and_composable_follow_progress_resume_and_unmount(
    framework: str,
    browser: Any,
    site: str,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    origin = site
    hub = HubProcess(tmp_path, REDIS_URL=redis_server.url, SMAPWS_ALLOWED_ORIGINS=origin)
    hub.start()
    context = browser.new_context()
    try:
        user = f"{framework}-user"
        context.add_cookies(
            [{"name": "access_token", "value": token(user), "url": origin, "httpOnly": True}]
        )
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{origin}/{framework}.html?hub={hub.port}")
        page.wait_for_function("document.getElementById('state')?.textContent === 'open'")

        # One connection (StrictMode mounted, unmounted and mounted again),
        # and each hook's listeners once.
        wait_for(lambda: health(hub.port)["websocket"]["active_connections"] == 1, 10, "1 tab")
        assert page.evaluate("service.listenerCount()") == LISTENERS[framework]

        progress = {
            "project_id": "p1", "status": "CRAWLING", "total": 1000, "done": 150,
            "errors": 2, "progress_percent": 15.0,
        }  # fmt: skip
        redis_server.publish(user, {"type": "project_progress", "payload": progress})
        note = {"title": "New Comment", "message": "Someone commented", "level": "info"}
        redis_server.publish(user, {"type": "notification", "payload": note})
        wait_for(lambda: (project(page, "p1") or {}).get("done") == "150", 10, "p1 progress")
        assert project(page, "p1") == shown("p1", "CRAWLING", 150, 1000, 2, 15)
        if framework == "react":  # a project with no message yet: the seed's initial state
            assert project(page, "p2") == shown("p2", "INITIALIZING", 0, 0, 0, 0)
        page.wait_for_function("document.querySelector('#notifications li')?.textContent")
        assert page.inner_text("#notifications") == "New Comment"

        # A drop: the socket closes under the client; what is published
        # while no connection exists comes with the resumed one (?since=).
        page.evaluate(
            "window.states = []; service.on('state', (s) => states.push(s));"
            "service.configure({ minDelay: 2000 }); Math.random = () => 0.5;"
            "service.ws.close(4000)"
        )
        wait_for(lambda: health(hub.port)["websocket"]["active_connections"] == 0, 10, "dropped")
        replayed = metric(hub.port, "websocket_replayed_messages_total")
        redis_server.publish(
            user, {"type": "project_progress", "payload": {**progress, "done": 600}}
        )
        away = {**note, "title": "While away"}
        redis_server.publish(user, {"type": "notification", "payload": away})
        completed = {**progress, "status": "DONE", "done": 1000, "progress_percent": 100.0}
        redis_server.publish(user, {"type": "project_completed", "payload": completed})
        wait_for(lambda: (project(page, "p1") or {}).get("status") == "DONE", 10, "completed")
        assert project(page, "p1") == shown("p1", "DONE", 1000, 1000, 2, 100)
        states = page.evaluate("states")
        assert [s["state"] for s in states] == ["reconnecting", "connecting", "open"]
        assert states[0]["code"] == 4000 and states[2]["resumed"] is True
        # The replay: the notification and the completion (which supersedes
        # the progress published before it), each once.
        assert metric(hub.port, "websocket_replayed_messages_total") == replayed + 2
        assert page.inner_text("#notifications").split("\n") == ["New Comment", "While away"]
        assert health(hub.port)["websocket"]["active_connections"] == 1

        # Unmount: every listener of the app is gone (only the test's
        # "state" one is left) and the connection the app needed is closed.
        page.evaluate("unmount()")
        page.wait_for_selector("#unmounted")
        wait_for(lambda: page.evaluate("service.state") == "closed", 10, "closed after unmount")
        assert page.evaluate("service.listenerCount()") == 1
        wait_for(lambda: health(hub.port)["websocket"]["active_connections"] == 0, 10, "closed")
        # Mounting again connects again, with fresh state.
        page.evaluate("mount()")
        page.wait_for_function("document.getElementById('state')?.textContent === 'open'")
        assert page.evaluate("service.listenerCount()") == LISTENERS[framework] + 1
        wait_for(lambda: health(hub.port)["websocket"]["active_connections"] == 1, 10, "again")
        assert page.inner_text("#notifications") == ""
        assert errors == []
    finally:
        context.close()
        hub.kill()
