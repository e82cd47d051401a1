"""The web console in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
register an expert through the upload form, chat with it pinned, with `auto` and with a
token-level method, read each routing explanation, browse the evaluation reports and the health
page, remove the expert. The browser console stays free of errors, nothing is fetched from
another origin, and an operator with a user key sees the pool but cannot change it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.service.test_openai_client import ServerThread

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "moerge" / "experts" / "library"
SHOTS = ROOT / "runs" / "ui-screenshots"
CHROMIUM = "/usr/bin/chromium"
ADMIN_KEY, USER_KEY = "console-admin", "console-user"
SLOW = 90_000          # ms: a generation on the reference engine, with margin for a busy machine
USER = {"Authorization": f"Bearer {USER_KEY}"}
UPPERCASE_CARD = "Rewrites a sentence in upper case (capital letters), keeping every word."

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def reports_root(tmp_path_factory) -> Path:
    """Two reports: the committed one, and a copy where glider lost 10 points and n changed."""
    root = tmp_path_factory.mktemp("reports")
    shutil.copytree(ROOT / "docs" / "results", root / "baseline")
    (root / "tweaked").mkdir()
    data = json.loads((root / "baseline" / "report.json").read_text())
    data["methods"]["glider"]["held_in"] -= 0.10
    data["config"]["n"] = 20
    (root / "tweaked" / "report.json").write_text(json.dumps(data))
    later = time.time() + 60
    os.utime(root / "tweaked" / "report.json", (later, later))
    return root


@pytest.fixture(scope="module")
def server(real_settings, tmp_path_factory, reports_root):
    from moerge.experts.bundled import library_entries
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={
        "pool_dir": tmp_path_factory.mktemp("console-pool"), "admin_key": ADMIN_KEY, "api_keys": [USER_KEY],
        "routing_method": "glider-global", "reports_dirs": [reports_root], "rate_limit_per_minute": 0})
    runtime = build_runtime(s, progress=lambda m: None)
    # One expert already in the pool, so `auto` and token-level routing have a choice to make.
    entry = next(e for e in library_entries() if e["name"] == "reverse_words")
    runtime.pool.register_lora(LIBRARY / "reverse_words", "reverse_words", entry["description"],
                               tags=entry["tags"], examples=entry["examples"])
    with ServerThread(create_app(runtime)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure_chromium.sh (make test does)")
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # Root cannot use Chromium's sandbox; the page only ever talks to our loopback server.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


class Watched:
    """A browser tab that records console errors, uncaught exceptions and off-origin requests."""

    def __init__(self, browser, url: str):
        self.url = url
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("request", lambda req: None if req.url.startswith((url, "blob:", "data:"))
                     else self.foreign.append(req.url))

    def open(self, page: str, key: str | None = None):
        self.page.goto(f"{self.url}/ui/{page}")
        if key is not None:
            self.page.fill("#key-input", key)
            self.page.click("#key-save")
        return self.page

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


def _copy_adapter(src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(src / f, dst / f)) for f in ("adapter_config.json", "adapter_model.safetensors")]


def _ask(page, model: str, prompt: str):
    from playwright.sync_api import expect
    page.select_option("#chat-model", model)
    page.fill("#chat-prompt", prompt)
    page.click("#chat-send")
    turn = page.locator(".turn").last
    expect(turn).to_have_attribute("data-state", "done", timeout=SLOW)
    return turn


def test_console_registers_chats_explains_and_removes_an_expert(server, browser, tmp_path):
    from playwright.sync_api import expect
    tab = Watched(browser, server)
    page = tab.open("pool", ADMIN_KEY)
    expect(page.locator("#key-status")).to_have_text("admin key")
    expect(page.locator("#pool-table tr[data-expert=reverse_words]")).to_be_visible()

    # Register a copy of the bundled uppercase adapter under a new name, through the form.
    files = _copy_adapter(LIBRARY / "uppercase", tmp_path / "shouty")
    page.fill("#upload-name", "shouty")
    page.fill("#upload-description", UPPERCASE_CARD)
    page.fill("#upload-examples", "Change the following text to upper case: the cat sat\nWrite in capitals: hello")
    page.fill("#upload-tags", "text, case")
    page.set_input_files("#upload-files", [str(f) for f in files])
    page.click("#upload-submit")
    expect(page.locator("#upload-ok")).to_contain_text("registered shouty (lora, rank 4)", timeout=SLOW)
    row = page.locator("#pool-table tr[data-expert=shouty]")
    expect(row).to_be_visible()
    # Size = every artifact the store holds for it: the weights plus what registration computed.
    card = next(e for e in httpx.get(f"{server}/v1/pool", headers=USER).json()["data"] if e["name"] == "shouty")
    weights = files[1].stat().st_size
    assert weights < card["size_bytes"] < 2 * weights, card["size_bytes"]
    expect(row.locator(".size")).to_have_text(f"{card['size_bytes'] / 2**20:.1f} MB")
    expect(row.locator(".requests")).to_have_text("0")
    assert "shouty" in [e["name"] for e in httpx.get(f"{server}/v1/experts").json()["data"]]

    # Pinned, streamed: the answer arrives in several chunks and says it was pinned to shouty.
    page = tab.open("playground")
    expect(page.locator("#chat-model option[value=shouty]")).to_have_count(1)
    turn = _ask(page, "shouty", "Change the following text to upper case: the pilot brings good news")
    assert int(turn.locator(".answer").get_attribute("data-chunks")) >= 2, "tokens did not stream"
    assert turn.locator(".answer").inner_text().strip()
    expect(turn.locator(".routing")).to_have_attribute("data-method", "pinned")
    expect(turn.locator(".route-experts tr.chosen")).to_have_attribute("data-expert", "shouty")

    # auto = glider-global here: the instruction it wrote, both experts scored, shouty chosen.
    turn = _ask(page, "auto", "Please rewrite this sentence in capital letters: we walk to the river")
    expect(turn.locator(".routing")).to_have_attribute("data-method", "glider-global")
    assert len(turn.locator(".instruction-text").inner_text().strip()) > 5
    expect(turn.locator(".route-experts tbody tr")).to_have_count(2)
    expect(turn.locator(".route-experts tr.chosen")).to_have_attribute("data-expert", "shouty")
    expect(turn.locator(".route-abstain")).to_have_count(0)

    # Token level: the last streamed chunk carries the per-layer usage; one heatmap row per expert.
    turn = _ask(page, "moerge:arrow", "Change the following text to upper case: a quiet morning")
    expect(turn.locator(".routing")).to_have_attribute("data-method", "arrow")
    expect(turn.locator(".run-on")).to_contain_text("Plan: token mixture, run on the reference engine")
    heat = turn.locator("table.heatmap")
    expect(heat.locator("tbody tr")).to_have_count(2)
    layers = heat.locator("thead th.layer").count()
    assert layers == 30, layers          # SmolLM2-135M has 30 layers
    expect(heat.locator("td.heat")).to_have_count(2 * layers)
    tab.shot("playground")

    page = tab.open("evaluation")
    expect(page.locator("#reports-list tbody tr")).to_have_count(2)
    page.select_option("#report-pick", str(reports_root_id(page, "baseline")))
    expect(page.locator("#report-view h2")).to_contain_text("baseline")
    glider = page.locator("#report-summary tr[data-method=glider] td")
    held_in = json.loads((ROOT / "docs" / "results" / "report.json").read_text())["methods"]["glider"]["held_in"]
    shown = f"{100 * held_in:.1f}"                 # the committed report's figure, as the page rounds it
    expect(glider.nth(1)).to_have_text(shown)
    plots = sorted(f.name for f in (ROOT / "docs" / "results").glob("*.png"))   # the report folder's own plots
    assert len(plots) >= 3, plots
    expect(page.locator("#report-plots img")).to_have_count(len(plots))
    page.wait_for_function("[...document.querySelectorAll('#report-plots img')].every(i => i.complete && i.naturalWidth > 0)")
    page.select_option("#compare-a", reports_root_id(page, "baseline"))
    page.select_option("#compare-b", reports_root_id(page, "tweaked"))
    page.click("#compare-go")
    expect(page.locator("#compare-table tr[data-method=glider] td").nth(2)).to_have_text(
        f"{shown} → {100 * held_in - 10:.1f} (-10.0)")
    expect(page.locator("#compare-view")).to_contain_text("n: 50 → 20")
    tab.shot("evaluation")

    page = tab.open("health")
    expect(page.locator("#engine-ready")).to_have_text("ready")
    expect(page.locator("#readiness tr[data-key=executor] td")).to_have_text("reference")
    # Each engine's describe() is shown as it comes: the same keys, nothing added.
    for engine in httpx.get(f"{server}/v1/engine", headers=USER).json()["engines"]:
        block = page.locator(f"#engines .engine[data-engine='{engine['name']}']")
        expect(block).to_have_count(1)
        keys = block.locator("tr").evaluate_all("rows => rows.map(r => r.dataset.key)")
        assert keys == list(engine["state"] or {}), (engine, keys)
    used = httpx.get(f"{server}/v1/stats", headers=USER).json()["experts"]["shouty"]
    assert used >= 2, used              # pinned, and chosen by auto (arrow may count it too)
    expect(page.locator("#expert-usage tr[data-expert=shouty] td").nth(1)).to_have_text(str(used))
    tab.shot("health")

    # Back on the pool: usage counted, then remove (two clicks) and the row is gone.
    page = tab.open("pool")
    row = page.locator("#pool-table tr[data-expert=shouty]")
    expect(row.locator(".requests")).to_have_text(str(used))
    tab.shot("pool")
    row.locator("button.remove").click()
    expect(row.locator("button.remove")).to_have_text("Confirm removal")
    row.locator("button.remove").click()
    expect(page.locator("#pool-message")).to_have_text("removed shouty")
    expect(page.locator("#pool-table tr[data-expert=shouty]")).to_have_count(0)
    assert "shouty" not in [e["name"] for e in httpx.get(f"{server}/v1/experts").json()["data"]]

    assert tab.errors == [], tab.errors
    assert tab.foreign == [], tab.foreign
    tab.close()


def reports_root_id(page, folder: str) -> str:
    """The id of the report in `folder`, as the Evaluation page lists it."""
    ids = page.eval_on_selector_all("#reports-list tbody tr", "rows => rows.map(r => r.dataset.report)")
    return next(i for i in ids if i.endswith("/" + folder))


def test_operator_with_a_user_key_sees_the_pool_but_cannot_change_it(server, browser, tmp_path):
    from playwright.sync_api import expect
    tab = Watched(browser, server)
    page = tab.open("pool", USER_KEY)
    expect(page.locator("#key-status")).to_have_text("user key")
    expect(page.locator("#pool-table tr[data-expert=reverse_words]")).to_be_visible()
    refusal = httpx.delete(f"{server}/v1/experts/reverse_words", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert refusal.status_code == 403
    expect(page.locator("#admin-refusal")).to_contain_text(refusal.json()["error"]["message"])
    expect(page.locator("#upload-submit")).to_be_disabled()
    expect(page.locator("#upload-files")).to_be_disabled()
    removes = page.locator("#pool-table button.remove")
    assert removes.count() >= 1
    for i in range(removes.count()):                # every row's, whatever an earlier test left in the pool
        expect(removes.nth(i)).to_be_disabled()
    tab.shot("pool-read-only")
    assert tab.errors == [], tab.errors

    # Forcing the disabled form open changes nothing: the API refuses, and the form says so inline.
    files = _copy_adapter(LIBRARY / "uppercase", tmp_path / "sneaky")
    page.eval_on_selector("#upload-form fieldset", "f => f.disabled = false")
    page.fill("#upload-name", "sneaky")
    page.set_input_files("#upload-files", [str(f) for f in files])
    page.click("#upload-submit")
    expect(page.locator("#upload-error")).to_have_text("403: " + refusal.json()["error"]["message"])
    assert [e for e in tab.errors if "status of 403" not in e] == [], tab.errors
    assert "sneaky" not in [e["name"] for e in httpx.get(f"{server}/v1/experts").json()["data"]]
    assert tab.foreign == [], tab.foreign
    tab.close()


def test_upload_form_shows_the_apis_validation_error_inline(server, browser, tmp_path):
    from playwright.sync_api import expect
    tab = Watched(browser, server)
    page = tab.open("pool", ADMIN_KEY)
    files = _copy_adapter(LIBRARY / "uppercase", tmp_path / "foreign")
    config = json.loads(files[0].read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"      # trained on another base
    files[0].write_text(json.dumps(config))
    api = httpx.post(f"{server}/v1/experts", data={"name": "foreign"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                     files=[("files", (f.name, f.read_bytes())) for f in files])
    assert api.status_code == 400, api.text
    page.fill("#upload-name", "foreign")
    page.set_input_files("#upload-files", [str(f) for f in files])
    page.click("#upload-submit")
    expect(page.locator("#upload-error")).to_have_text("400: " + api.json()["error"]["message"])
    expect(page.locator("#upload-error")).to_contain_text("Llama-3.2-1B")
    expect(page.locator("#pool-table tr[data-expert=foreign]")).to_have_count(0)
    assert [e for e in tab.errors if "status of 400" not in e] == [], tab.errors
    tab.close()


def test_console_pages_are_shells_and_data_needs_a_key(server):
    shell = httpx.get(f"{server}/ui/pool")
    assert shell.status_code == 200 and "/ui/static/console.js" in shell.text
    assert "default-src 'self'" in shell.headers["content-security-policy"]
    assert httpx.get(f"{server}/ui/nope").status_code == 404
    for path in ("/v1/pool", "/v1/engine", "/v1/stats", "/v1/reports"):
        assert httpx.get(server + path).status_code == 401, path
        assert httpx.get(server + path, headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 200, path
    access = httpx.get(f"{server}/v1/access", headers={"Authorization": f"Bearer {USER_KEY}"}).json()
    assert access == {"keys_required": True, "key_sent": True, "chat": True, "admin": False, "chat_error": None,
                      "admin_error": "this key may chat but not change experts: use the admin key"}
    assert httpx.get(f"{server}/v1/reports/..%2F..%2Fetc/plots/passwd",
                     headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 404


def test_cli_shows_what_the_console_shows(server, reports_root):
    from typer.testing import CliRunner

    from moerge.cli import app
    run = CliRunner().invoke
    listed = run(app, ["reports", "list", "--dir", str(reports_root), "--json"])
    assert listed.exit_code == 0, listed.output
    ids = [r["id"] for r in json.loads(listed.output)]
    assert [i.rsplit("/", 1)[1] for i in ids] == ["tweaked", "baseline"]
    compared = run(app, ["reports", "compare", ids[1], ids[0], "--dir", str(reports_root), "--json"])
    glider = next(r for r in json.loads(compared.output)["rows"] if r["method"] == "glider")
    assert round(glider["held_in"]["delta"], 6) == -0.1
    missing = run(app, ["reports", "show", "nope", "--dir", str(reports_root)])
    assert missing.exit_code == 1 and "no evaluation report 'nope'" in missing.output
    status = run(app, ["status", "--url", server, "--api-key", USER_KEY, "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert data["engine"]["ready"] and data["engine"]["executor"] == "reference"
    assert "reverse_words" in [x["name"] for x in data["pool"]]
    refused = run(app, ["status", "--url", server])
    assert refused.exit_code == 1 and "401" in refused.output
