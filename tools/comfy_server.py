"""Start and drive a real ComfyUI server headless (CPU, loopback, throw-away directories).

Client side uses only the standard library (``urllib``). Used by ``tools/run_workflow.py`` and by the
server and browser tests. The pack is made visible to ComfyUI through an extra-model-paths
``custom_nodes:`` entry pointing at a temporary folder that holds one symlink named
``distilled_unets`` to this checkout, unless ComfyUI already has the checkout in its own
``custom_nodes/``.

Nothing is written inside the ComfyUI tree: every folder the server writes to is the server's own,
through ComfyUI's command-line flags (the same in 0.3.64 and 0.33) and one extra-model-paths entry:

* ``--output-directory`` (images, the distiller's checkpoints under ``distilled_unets/``),
  ``--temp-directory``, ``--input-directory``, ``--user-directory`` (settings, workflows) and
  ``--database-url sqlite:///:memory:`` (else ComfyUI creates ``user/comfyui.db`` in its own folder);
* ``models_out`` (default ``<workdir>/models``), listed FIRST (``is_default: true``) for the model
  folders that savers write to: ``diffusion_models`` (Save Student UNet writes to the first one),
  ``checkpoints``, ``loras`` and ``datasets`` (ComfyUI 0.33's SaveTrainingDataset writes to the
  first one). ComfyUI's own ``models/`` stays readable (listed after).

``--base-directory`` is not used: it would also move ``models/`` and ``custom_nodes/``, hiding the
user's models and other packs from the quick start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from _host import PACK as PACK_FOLDER
from _host import REPO

log = logging.getLogger("distilled_unets.tools")

#: model folders listed first on the server from ``models_out``: where savers that pick a model folder write
WRITTEN_MODEL_FOLDERS = ("diffusion_models", "checkpoints", "loras", "datasets")


class ServerError(RuntimeError):
    """The server did not start, or answered with an error."""


def pack_installed_in(comfyui: Path) -> bool:
    """True when ComfyUI's own custom_nodes/ already holds this checkout (as a folder or a symlink)."""
    cn = comfyui / "custom_nodes"
    if not cn.is_dir():
        return False
    for entry in cn.iterdir():
        try:
            if entry.is_dir() and entry.resolve() == REPO:
                return True
        except OSError:
            continue
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI ``main.py`` subprocess on 127.0.0.1 with its own user/input/output/temp directories.

    ``model_dirs`` are extra models roots (each laid out like ``ComfyUI/models``: ``checkpoints/``,
    ``diffusion_models/``, ``loras/`` ...), read only. ``models_out`` is where the models a workflow
    saves go (:data:`WRITTEN_MODEL_FOLDERS` under it), ``output_dir`` ComfyUI's output folder; both
    default to folders of ``workdir`` (a new temporary folder unless given, removed by
    :meth:`cleanup`). Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, comfyui: Path, model_dirs=(), *, python: str | None = None, workdir: Path | None = None,
                 models_out: Path | None = None, output_dir: Path | None = None, extra_args=(),
                 startup_timeout: float = 180.0):
        self.comfyui = Path(comfyui)
        self.model_dirs = [Path(d).expanduser().resolve() for d in model_dirs]
        self.python = python or sys.executable
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="comfy-server-"))
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port = None
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.output_dir = Path(output_dir).resolve() if output_dir else self.workdir / "output"
        self.models_out = Path(models_out).resolve() if models_out else self.workdir / "models"
        self.log_path = self.workdir / "server.log"

    # -- lifecycle -------------------------------------------------------------------------------
    def _write_config(self) -> Path:
        # first (is_default): the models this server writes, never the ComfyUI installation's models/
        cfg = {"distilled_unets_written": {"base_path": str(self.models_out), "is_default": True,
                                           **{f: f for f in WRITTEN_MODEL_FOLDERS}}}
        for i, d in enumerate(self.model_dirs):
            sub = {"base_path": str(d)}
            for folder in ("checkpoints", "diffusion_models", "unet", "loras", "vae", "text_encoders", "clip",
                           "diffusers", "embeddings"):
                if (d / folder).is_dir():
                    sub[folder] = folder
            cfg[f"models_{i}"] = sub
        if not pack_installed_in(self.comfyui):
            nodes_dir = self.workdir / "custom_nodes"
            nodes_dir.mkdir(exist_ok=True)
            link = nodes_dir / PACK_FOLDER
            if not link.exists():
                link.symlink_to(REPO, target_is_directory=True)
            cfg["distilled_unets_pack"] = {"custom_nodes": str(nodes_dir)}
        path = self.workdir / "extra_model_paths.yaml"
        # YAML is a superset of JSON: no yaml dependency on the client side.
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def start(self) -> "ComfyServer":
        for d in (self.output_dir, self.workdir / "input", self.workdir / "user", self.workdir / "temp",
                  self.models_out):  # the savers make their model folders when they first write
            d.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        self.port = free_port()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", str(cfg),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.workdir / "input"),
               "--user-directory", str(self.workdir / "user"), "--temp-directory", str(self.workdir / "temp"),
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--log-stdout", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        log.info("starting ComfyUI: %s (log: %s)", " ".join(cmd), self.log_path)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with status {self.proc.returncode} while starting:\n"
                                  + self.log_tail())
            try:
                self.get_json("/system_stats", timeout=2)
                log.info("ComfyUI is up at %s (pid %d)", self.url, self.proc.pid)
                return self
            except (OSError, ServerError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n" + self.log_tail())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log_file", None):
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- HTTP ------------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 60):
        status, body = self._request(path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} -> HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def get_bytes(self, path: str, timeout: float = 60) -> bytes:
        status, body = self._request(path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} -> HTTP {status}")
        return body

    def free(self, settle: float = 1.0) -> None:
        """Unload the models and drop the executor's cache (ComfyUI's POST /free), so the next prompt starts from
        empty memory: the student workflows hold a full-size teacher and student each. The worker thread acts on
        it when idle; ``settle`` seconds let it do so before another prompt is queued."""
        status, body = self._request("/free", {"unload_models": True, "free_memory": True})
        if status != 200:
            raise ServerError(f"POST /free -> HTTP {status}: {body[:200]!r}")
        time.sleep(settle)

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id. A rejected prompt raises :class:`PromptRejected`."""
        status, body = self._request("/prompt", {"prompt": prompt, "client_id": self.client_id,
                                                 "extra_data": extra_data or {}})
        data = json.loads(body or b"{}")
        if status != 200:
            raise PromptRejected(data, prompt)
        return data["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.2) -> dict:
        """Poll /history until the prompt finished; returns its history entry (``status``, ``outputs``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.get_json(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None \
                    and (h[prompt_id]["status"].get("status_str") in ("success", "error")):
                return h[prompt_id]
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError("ComfyUI exited while running the prompt:\n" + self.log_tail())
            time.sleep(poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, extra_data: dict | None = None, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt, extra_data), timeout=timeout)

    def output_images(self, entry: dict) -> list[Path]:
        """Paths of the output images (type "output") listed in a history entry."""
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    out.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return out


class PromptRejected(ServerError):
    """POST /prompt answered 400: the prompt failed validation (``node_errors`` says where).

    ``node_id`` / ``node_type`` name the node the top-level error is about, when it is about one. The
    node is read from ``details`` ("Node ID '#6'"), which every ComfyUI version sends, and its type from
    the prompt that was sent: ComfyUI 0.3.64 names an unknown type only in its message ("node X does
    not exist", ``invalid_prompt``), later versions only in ``extra_info.class_type``
    (``missing_node_type``, the message naming the node's title).
    """

    def __init__(self, data: dict, prompt: dict | None = None):
        self.data = data
        err = data.get("error", {})
        err = err if isinstance(err, dict) else {"message": str(err)}
        self.error_type = err.get("type")
        extra = err.get("extra_info") or {}
        m = re.fullmatch(r"Node ID '#(.+)'", str(err.get("details") or ""))
        self.node_id = str(extra.get("node_id") or (m.group(1) if m else "")) or None
        sent = (prompt or {}).get(self.node_id) or {}
        self.node_type = extra.get("class_type") or sent.get("class_type")
        server_msg = err.get("message", "prompt rejected")
        unknown = self.error_type == "missing_node_type" or (
            self.node_type is not None and f"node {self.node_type} does not exist" in server_msg)
        if unknown and self.node_type:
            title = (sent.get("_meta") or {}).get("title") or extra.get("node_title")
            msg = (f"node {self.node_id}{f' ({title!r})' if title else ''} is of type {self.node_type!r}, which "
                   f"this ComfyUI does not know: install the custom node pack that provides {self.node_type!r} "
                   f"(or check its spelling). ComfyUI said: {server_msg}")
        else:
            msg = server_msg
        details = []
        for nid, ne in (data.get("node_errors") or {}).items():
            for e in ne.get("errors", []):
                details.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__(msg + ("\n" + "\n".join(details) if details else ""))


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry, or None when it succeeded."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    for event, data in status.get("messages", []):
        if event == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}".strip()
    return "failed without an execution_error message"
