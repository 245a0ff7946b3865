"""Screenshot a sweep in the MLflow UI with headless Chromium (how docs/img/mlflow_*.png were made).

    LITELLM_LOCAL_MODEL_COST_MAP=True mlflow server --backend-store-uri sqlite:///$PWD/outputs/granularity/mlflow.db \
        --host 127.0.0.1 --port 5000 --workers 1 &
    python docs/img/mlflow_screenshot.py --ui http://127.0.0.1:5000 --tracking-uri sqlite:///$PWD/outputs/granularity/mlflow.db \
        --experiment granularity --out docs/img

Takes two pictures: the experiment's runs table (the sweep's parent run expanded into its trial
runs, with the axis and accuracy columns) and MLflow's run comparison of the trial runs. Drives
Chromium over the DevTools protocol (`chromium --headless --remote-debugging-port`); needs the
`chromium` package and aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

EXPAND_PARENT = """
(() => {
  const expander = document.querySelector('button[data-component-id*="runnamecellrenderer"]');
  if (expander) expander.click();
  const columns = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Columns');
  if (columns) columns.click();
  return !!expander;
})()
"""

# Tick these columns in the "Columns" menu opened above, then close it.
SHOW_COLUMNS = """
(() => {
  const pop = document.querySelector('[data-component-id="mlflow.experiment_page.runs_table.column_selector"]');
  if (!pop) return 'no column selector';
  const wanted = ['level', 'student', 'accuracy', 'final_train_loss', 'mean_generated_tokens'];
  const ticked = [];
  for (const name of wanted) {
    const leaf = [...pop.querySelectorAll('*')].find(e => e.children.length === 0 && e.textContent.trim() === name);
    const node = leaf && (leaf.closest('[role="treeitem"]') || leaf);
    const box = node && node.querySelector('.du-bois-light-tree-checkbox, input[type="checkbox"], [role="checkbox"]');
    if (box || leaf) { (box || leaf).click(); ticked.push(name); }
  }
  document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
  const close = document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();
  return ticked.join(',');
})()
"""


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.next_id:
                return msg.get("result", {})

    async def shoot(self, url: str, path: Path, settle_s: float, scripts: tuple[str, ...] = ()) -> None:
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(settle_s)
        for script in scripts:
            result = await self.call("Runtime.evaluate", expression=script)
            print(f"{path.name}: {result.get('result', {}).get('value')}")
            await asyncio.sleep(settle_s / 2)
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"wrote {path}")


def trial_runs(tracking_uri: str, experiment: str) -> tuple[str, list[str]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"{tracking_uri}: no experiment named {experiment!r}")
    # The runs page of MLflow 3 opens in its GenAI view unless the experiment says it holds training runs.
    client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
    runs = client.search_runs([exp.experiment_id], "tags.`raydistill.trial_hash` != ''",
                              order_by=["params.level ASC"])
    return exp.experiment_id, [r.info.run_id for r in runs]


async def capture(ui: str, experiment_id: str, run_ids: list[str], out: Path, settle_s: float) -> None:
    import aiohttp

    port = 9333
    profile = tempfile.mkdtemp(prefix="rd-chromium-")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                             "--window-size=2200,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                tabs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2).read())
                break
            except OSError:
                time.sleep(0.2)
        ws_url = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Emulation.setDeviceMetricsOverride", width=2200, height=900, deviceScaleFactor=1,
                            mobile=False)
            await page.shoot(f"{ui}/#/experiments/{experiment_id}/runs", out / "mlflow_runs.png", settle_s,
                             (EXPAND_PARENT, SHOW_COLUMNS))
            query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
            await page.shoot(f"{ui}/#/compare-runs?{query}", out / "mlflow_compare.png", settle_s)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ui", default="http://127.0.0.1:5000")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--settle-s", type=float, default=8.0, help="wait for the UI to render")
    args = parser.parse_args()
    experiment_id, run_ids = trial_runs(args.tracking_uri, args.experiment)
    asyncio.run(capture(args.ui.rstrip("/"), experiment_id, run_ids, Path(args.out), args.settle_s))


if __name__ == "__main__":
    main()
