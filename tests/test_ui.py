"""What a user sees in the MLflow UI after `kt main`, rendered by headless Chromium against a real
tracking server: the experiment in the model-training view, the runs by name, the evaluation's summary
table and figure, the pair dataset's schema and profile, and the registered translator with its
description and alias.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), so the test needs
no Python package beyond the standard library, and can click (the dataset drawer opens on a click).
"""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest
from conftest import kt

import kt_mlflow

pytestmark = pytest.mark.server

EXPERIMENT, MODEL = "kt-ui", "kt-ui-translator"
TINY = ["--dataset", "digits", "--n-pairs", "8", "--n-val", "4", "--gen-epochs", "1", "--epochs", "4",
        "--select-holdout", "2", "--members", "4", "--experiment-name", EXPERIMENT, "--registered-name", MODEL]
MODEL_VIEW = "workflowType=machine_learning"


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to render the MLflow UI and none is on PATH: "
                "apt-get install chromium (Debian/Ubuntu), then rerun.")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe; every call has a timeout."""

    def __init__(self, binary: str, shots: Path, timeout: float = 60.0) -> None:
        self.timeout, self.shots = timeout, shots
        self.profile = tempfile.mkdtemp(prefix="kt-ui-chromium-")  # a fresh browser: nothing remembered
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}", "--window-size=1400,1000", "about:blank"]
        # Chromium reads the protocol on fd 3 and writes it on fd 4.
        shell = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen(["bash", "-c", shell, *args], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session = b"", 0, None
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable")
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"chromium {method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.time()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"chromium did not answer {method} within {self.timeout:.0f}s "
                                   f"(exit code {self.proc.poll()})")
            ready, _, _ = select.select([self._from_chrome], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self._buf += chunk

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"javascript failed: {res['exceptionDetails'].get('text')} in {expression[:100]}")
        return res["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, *needles: str, timeout: float = 60.0, shot: str = "page") -> str:
        """The page's visible text once it holds every needle; fails with the text and a screenshot."""
        deadline = time.time() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.time() > deadline:
                path = self.screenshot(f"{shot}-missing")
                raise AssertionError(f"not shown after {timeout:.0f}s: {missing} (screenshot {path})\n"
                                     f"--- visible text ---\n{text[:4000]}")
            time.sleep(0.5)

    def click(self, label: str, prefix: bool = False, among: str = "body *") -> None:
        """Click the innermost visible element (matching the CSS selector ``among``) whose text is
        ``label`` (or starts with it)."""
        found = self.js(
            "(() => { const want = %s, prefix = %s; let best = null;"
            " for (const el of document.querySelectorAll(%s)) {"
            "   if (el.getClientRects().length === 0) continue;"
            "   const t = (el.innerText || '').trim();"
            "   if (prefix ? t.startsWith(want) : t === want) best = el; }"
            " if (best) { best.click(); return true; } return false; })()"
            % (json.dumps(label), json.dumps(prefix), json.dumps(among)))
        if not found:
            path = self.screenshot("click-missing")
            raise AssertionError(f"nothing labelled {label!r} to click (screenshot {path})\n{self.text()[:3000]}")

    def screenshot(self, name: str) -> Optional[Path]:
        try:
            data = self.call("Page.captureScreenshot", format="png")["data"]
        except Exception:
            return None
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    b = Browser(binary, tmp_path_factory.mktemp("ui-shots"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def made(tracking_server, tmp_path_factory):
    """One tiny `kt main` against the server (its KT_HOME a temporary folder); what it made, by id."""
    from mlflow.tracking import MlflowClient

    home = tmp_path_factory.mktemp("ui-kt-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_server)
        mp.setenv("KT_HOME", str(home))
        for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            mp.delenv(var, raising=False)
        res = kt("main", *TINY, cwd=home, env=os.environ.copy(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {}
    for step in ("main", "generate", "train", "evaluate"):
        (run,) = client.search_runs([exp.experiment_id], f"tags.`kt.step` = '{step}'")
        runs[step] = run
    version = client.get_model_version(MODEL, "1")
    model_id = getattr(version, "model_id", None) or client.search_logged_models([exp.experiment_id])[0].model_id
    return {"uri": tracking_server, "exp": exp.experiment_id, "runs": runs, "stdout": res.stdout,
            "version": version, "model_id": model_id, "client": client}


def page(made, route: str) -> str:
    """A page of the UI in its model-training view (what the links kt prints open)."""
    return f"{made['uri']}/#/{route}?{MODEL_VIEW}"


def test_kt_prints_links_to_the_model_training_view(made):
    links = re.findall(r"View (?:run .*?|experiment) at: (\S+)", made["stdout"])
    assert links and all(link.endswith(MODEL_VIEW) for link in links), links
    assert page(made, f"experiments/{made['exp']}") in made["stdout"]


def test_experiment_opens_in_the_model_training_view_with_the_runs_by_name(made, browser):
    exp, runs = made["exp"], made["runs"]
    browser.goto(page(made, f"experiments/{exp}"))
    text = browser.wait_for("main paper_mnist best", "Runs", "Models", "Model registry", shot="experiment")
    assert "Evaluation runs" not in text and "Evaluations" not in text  # the GenAI view's navigation
    # The child runs, under their parent: expand it.
    expanded = browser.js(
        "(() => { const a = Array.from(document.querySelectorAll('a')).find(e => e.innerText.trim() === "
        "'main paper_mnist best'); const cell = a && a.closest('[role=gridcell], .ag-cell');"
        " const button = cell && cell.querySelector('button'); if (button) { button.click(); return true; }"
        " return false; })()")
    assert expanded, "no expand button beside the parent run in the runs table"
    browser.wait_for("pairs paper_mnist 8+4", "translator channel_set best", f"evaluate models:/{MODEL}/1",
                     "kt-pairs-paper_mnist-digits", shot="experiment-children")
    assert runs["train"].info.run_name == "translator channel_set best"
    # The experiment's description tells whoever lands in the GenAI view where the runs are; the switch
    # to Model training is remembered by the browser.
    browser.goto(f"{made['uri']}/#/experiments/{exp}")
    browser.wait_for("Model training", "Knowledge Translation (kt-mlflow)", shot="experiment-bare")
    browser.click("Model training", among="[role=button]")  # the switch at the top left
    browser.wait_for("main paper_mnist best", "Model registry", shot="experiment-switched")
    browser.goto(f"{made['uri']}/#/experiments/{exp}/runs/{runs['main'].info.run_id}")
    text = browser.wait_for("main paper_mnist best", "Parameters", shot="main-bare")
    assert "Evaluations" not in text


def test_main_and_evaluate_runs_show_their_results(made, browser):
    exp, runs = made["exp"], made["runs"]
    browser.goto(page(made, f"experiments/{exp}/runs/{runs['main'].info.run_id}"))
    browser.wait_for("main paper_mnist best", "generate_run", runs["generate"].info.run_id, "train_run",
                     f"models:/{MODEL}/1", shot="main-run")

    ev = runs["evaluate"].info.run_id
    browser.goto(page(made, f"experiments/{exp}/runs/{ev}"))
    browser.wait_for(f"evaluate models:/{MODEL}/1", "kt_gap_closed", "l1_acc_mean", "gap_closed",
                     "kt-pairs-paper_mnist-digits", "Parent run", shot="evaluate-run")
    browser.goto(page(made, f"experiments/{exp}/runs/{ev}/artifacts/summary.json"))
    text = browser.wait_for("accuracy_buckets.html", "summary.json", "per_network.json", "gap_closed",
                            shot="evaluate-summary")
    table = text[text.index("gap_closed"):].split()
    for method in ("random", "l1", "kt", "trained", "large"):
        assert method in table, f"{method} not in the summary table: {table[:80]}"


def test_train_run_shows_the_architecture_trained_and_the_pair_dataset(made, browser):
    exp, train = made["exp"], made["runs"]["train"]
    assert train.data.params["arch"] == "channel_set"
    assert "best_epoch" in train.data.metrics and "best_best_epoch" not in train.data.metrics
    browser.goto(page(made, f"experiments/{exp}/runs/{train.info.run_id}"))
    text = browser.wait_for("translator channel_set best", "channel_set", "best_epoch", MODEL,
                            "kt-pairs-paper_mnist-digits", shot="train-run")
    assert "best_best_epoch" not in text
    digest = train.inputs.dataset_inputs[0].dataset.digest
    browser.click(f"kt-pairs-paper_mnist-digits ({digest})")
    text = browser.wait_for("Data details for", "train pairs", "val pairs", "Digest", "Name", "Type",
                            "large.conv1.weight", "small.conv1.weight", "float32 [6, 6, 3, 3] per pair",
                            shot="dataset-drawer")
    assert "Unrecognized Schema Format" not in text and "Array Datasource" not in text


def test_registered_translator_has_a_description_and_the_candidate_alias(made, browser):
    version, train_id = made["version"], made["runs"]["train"].info.run_id
    assert version.aliases == ["candidate"]
    browser.goto(page(made, f"models/{MODEL}/versions/1"))
    browser.wait_for("Version 1", "candidate", "Knowledge Translation translator for paper_mnist",
                     "basic", "bottleneck", "recipe: best", "architecture: channel_set", "validation accuracy",
                     train_id, "translator channel_set best", "kt.family", shot="model-version")
    browser.goto(page(made, f"models/{MODEL}"))
    browser.wait_for(MODEL, "Version 1", "candidate", "Knowledge Translation translators (kt-mlflow)",
                     "champion", shot="registered-model")


def test_logged_model_names_its_translator_folder_and_no_temporary_path(made, browser):
    browser.goto(page(made, f"experiments/{made['exp']}/models/{made['model_id']}/artifacts"))
    browser.wait_for("translator", "MLmodel", "data", shot="logged-model")
    browser.click("data")
    browser.wait_for("translator", shot="logged-model-tree")
    browser.click("MLmodel")
    text = browser.wait_for("python_function", "kt_mlflow.tracking.pyfunc_loader", "data/translator",
                            shot="logged-model-mlmodel")
    # The installed package's own path (model_code_path) may lie anywhere, a temp folder in CI included.
    text = text.replace(str(Path(kt_mlflow.__file__).resolve().parents[1]), "<package>")
    assert not re.search(r"/tmp\w*/|\btmp[a-z0-9_]{6,}\b", text), "a temporary folder shows in the MLmodel"
