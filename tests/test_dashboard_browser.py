"""The dashboard pages in a real browser (issue #19): headless Chromium loads the index and one atom page from
``file://``, takes a screenshot, and the rendered DOM (``--dump-dom``) holds the atom's top tokens; Chromium's
network log shows that the pages made no network request.

How "no request" is checked: Chromium writes every request of the network stack to ``--log-net-log``; a request a
page makes carries the page's site (``file://``) in its network isolation key, while the browser's own background
traffic (update checks and the like, which flags cannot fully silence) carries another key. Two controls show the
check can fail: a page with an ``<img>`` on ``http://127.0.0.1:9`` is seen requesting it, and the same page under
the dashboards' Content-Security-Policy is not (the policy blocks the fetch). Skips when no Chromium binary is found
(Debian's ``chromium`` package; CI installs it)."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from family_models import family_model
from sae_checks import firing_sae
from writesae_lens.dashboard import atom_dashboards, scan_for_dashboards, write_dashboard
from writesae_lens.dashboard.render import CSP, atom_page_name

LAYER, HEAD = 1, 2
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(name)), None)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")]

QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-pings",
         "--disable-domain-reliability", "--disable-breakpad", "--disable-features=Translate,MediaRouter,SpellCheck"]


def chromium(url: str, tmp: Path, *extra: str) -> tuple[str, list[str]]:
    """Run headless Chromium on ``url``; return its stdout and the URLs the page requested over the network."""
    netlog = tmp / f"netlog-{len(list(tmp.glob('netlog-*')))}.json"
    profile = tmp / f"profile-{netlog.stem}"
    done = subprocess.run([CHROMIUM, *QUIET, f"--user-data-dir={profile}", f"--log-net-log={netlog}", *extra, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, page_requests(json.loads(netlog.read_text(encoding="utf-8")))


def page_requests(log: dict) -> list[str]:
    """URLs of the requests a ``file://`` page started (see module doc)."""
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params", {})
        if event["type"] == start and "url" in params:
            key, initiator = str(params.get("network_isolation_key", "")), str(params.get("initiator", ""))
            if key.startswith("file://") or initiator == "null" or initiator.startswith("file:"):
                urls.append(params["url"])
    return urls


class Collect(HTMLParser):
    """Text and ``data-*`` attributes of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.text, self.token_ids, self.atoms, self.contexts = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-token-id" in attrs:
            self.token_ids.append(int(attrs["data-token-id"]))
        if "data-atom" in attrs:
            self.atoms.append(int(attrs["data-atom"]))
        if "context" in (attrs.get("class") or "").split():
            self.contexts += 1

    def handle_data(self, data):
        self.text.append(data)


def parse(dom: str) -> Collect:
    collect = Collect()
    collect.feed(dom)
    return collect


@pytest.fixture(scope="module")
def site(qwen35_pair, tmp_path_factory):
    model = family_model("qwen35", qwen35_pair, None)
    tokens = torch.randint(0, 90, (4, 20), generator=torch.Generator().manual_seed(5))
    sae = firing_sae(model, tokens, LAYER, HEAD, d_sae=16, k=4, seed=2)
    scan = scan_for_dashboards(model, sae, LAYER, HEAD, tokens, progress=False)
    data = atom_dashboards(model, sae, scan, n_atoms=3, n_tokens=5, min_token_count=1, progress=False)
    data.token_text = {i: f"w{i}q" for i in data.token_text}  # words the DOM check can find
    folder = tmp_path_factory.mktemp("dashboard")
    write_dashboard(data, folder, progress=False)
    return data, folder


def test_index_and_atom_page_render_offline_with_their_top_tokens(site, tmp_path):
    data, folder = site
    page = data.atoms[0]
    dom, requests = chromium((folder / "index.html").as_uri(), tmp_path, "--dump-dom")
    assert requests == []
    index = parse(dom)
    assert index.atoms == [p.atom for p in data.atoms]

    atom_url = (folder / "atoms" / atom_page_name(page.atom)).as_uri()
    dom, requests = chromium(atom_url, tmp_path, "--dump-dom")
    assert requests == []
    rendered = parse(dom)
    text = "".join(rendered.text)
    assert rendered.atoms == [page.atom] and f"Atom {page.atom}" in text
    assert rendered.contexts == len(page.top_contexts) > 0
    effects = page.logit_effects
    for token in effects.loc[effects["side"] == "promoted", "token"]:
        assert token in rendered.token_ids and data.token_text[token] in text
    top_context_token = page.top_contexts["token"].iloc[0]
    assert data.token_text[top_context_token] in text

    shot = tmp_path / "atom.png"
    _, requests = chromium(atom_url, tmp_path, f"--screenshot={shot}", "--window-size=1000,900")
    assert requests == []
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]  # [h, w, 3] floats in 0..1
    bar = np.array([224, 138, 46]) / 255  # the histogram bars' colour: the inline CSS was applied
    assert (np.abs(pixels - bar).max(-1) < 0.02).sum() > 100


def test_the_request_check_sees_a_request_and_the_policy_blocks_it(tmp_path):
    image = '<img src="http://127.0.0.1:9/probe.png" alt="">'
    open_page, guarded_page = tmp_path / "open.html", tmp_path / "guarded.html"
    open_page.write_text(f"<!DOCTYPE html><html><body>{image}<p>probe</p></body></html>", encoding="utf-8")
    guarded_page.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                            f'content="{CSP}"></head><body>{image}<p>probe</p></body></html>', encoding="utf-8")
    _, requests = chromium(open_page.as_uri(), tmp_path, "--dump-dom")
    assert requests == ["http://127.0.0.1:9/probe.png"]
    _, requests = chromium(guarded_page.as_uri(), tmp_path, "--dump-dom")
    assert requests == []
