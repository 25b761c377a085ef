"""The CoT page: one self-contained HTML file, checked as text and driven in a real headless browser.

The browser tests skip (saying how to install one) where no chromium is found; `.ci/run` installs it.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from browser import Browser, find_browser, install_hint
from hookedcot.cot.page import render_html, shade_levels, write_html

HOSTILE = """if a < b && c > d: "</script><script>window.pwned = 1</script>" it's <b>bold</b> &amp; done"""
S = 12
CLICKED = 7
# Row CLICKED of attention over the earlier steps 0..6: the top five by weight are 1, 3, 5, 4, 6.
ATTENTION_ROW = [0.02, 0.30, 0.01, 0.20, 0.10, 0.15, 0.05]
# Row CLICKED of suppression over the later steps 8..11: 9 is not measured, so 10, 8, 11.
SUPPRESSION_ROW = [0.4, None, 0.9, 0.1]


def trace_data() -> dict:
    texts = [f"Step number {i} says {i} + {i} = {2 * i}." for i in range(S)]
    texts[2] = HOSTILE
    attention = [[0.01 * (j + 1) if j < i else 0.0 for j in range(S)] for i in range(S)]
    attention[CLICKED][:CLICKED] = ATTENTION_ROW
    suppression = [[0.02 if j > i else None for j in range(S)] for i in range(S)]
    suppression[CLICKED][CLICKED + 1:] = SUPPRESSION_ROW
    return {
        "title": "Tom's <apples> & pears",
        "prompt": "Tom has 3 apples and buys 2 more. How many?",
        "answer": "5", "correct_answer": "5", "model": "tiny",
        "steps": [{"index": i, "text": t, "tokens": [10 * i, 10 * i + 9]} for i, t in enumerate(texts)],
        "measures": {
            "resampling": [0.1 * i for i in range(S - 1)] + [None],
            "counterfactual": [1.0 - 0.05 * i for i in range(S - 2)] + [float("nan"), 0.3],
        },
        "measure_labels": {"resampling": "resampling importance (KL)"},
        "attention": attention,
        "suppression": suppression,
        "receiver_heads": [{"layer": 12, "head": 5, "kurtosis": 8.1}, {"layer": 3, "head": 0, "kurtosis": None}],
    }


class Elements(HTMLParser):
    """Every start tag with its attributes, and each step element's text, as a browser's parser sees them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.step_texts: dict[int, str] = {}
        self._in_step: int | None = None
        self.scripts: list[tuple[dict, str]] = []  # (attributes, text) of each <script>
        self._in_script = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "span" and "step" in (attrs.get("class") or "").split():
            self._in_step = int(attrs["data-step"])
            self.step_texts[self._in_step] = ""
        if tag == "script":
            self._in_script = True
            self.scripts.append((attrs, ""))

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_step = None
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_step is not None:
            self.step_texts[self._in_step] += data
        if self._in_script:
            self.scripts[-1] = (self.scripts[-1][0], self.scripts[-1][1] + data)


def payload(page: str) -> dict:
    """The JSON the page's script reads, parsed strictly (NaN or Infinity in it would raise)."""
    (data,) = [text for attrs, text in Elements(page).scripts if attrs.get("type") == "application/json"]
    return json.loads(data, parse_constant=lambda name: pytest.fail(f"{name} in the page's JSON"))


# ---- the page as text ----------------------------------------------------------------------------


def test_every_step_is_one_element_carrying_its_index_and_its_exact_text():
    data = trace_data()
    parsed = Elements(render_html(data))
    assert parsed.step_texts == {i: s["text"] for i, s in enumerate(data["steps"])}


def test_a_step_holding_script_end_tags_and_markup_stays_text():
    page = render_html(trace_data())
    parsed = Elements(page)
    assert [tag for tag, _ in parsed.tags].count("script") == 2  # the data and the page's own code, nothing more
    assert "<b>bold</b>" not in page and "</script><script>" not in page
    assert payload(page)["steps"][2]["text"] == HOSTILE
    assert "Tom&#x27;s &lt;apples&gt; &amp; pears" in page  # the title, escaped


def test_the_page_names_no_external_resource():
    page = render_html(trace_data())
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"@import|url\(|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)
    hostile = trace_data()
    hostile["steps"][0]["text"] = '<img src="https://example.com/x.png"> <a href="http://example.com">x</a>'
    linked = [(tag, attrs) for tag, attrs in Elements(render_html(hostile)).tags if {"src", "href"} & set(attrs)]
    assert linked == []


def test_links_are_the_top_earlier_steps_by_attention_and_later_steps_by_suppression():
    data = payload(render_html(trace_data()))
    assert data["attends"][CLICKED] == [[1, 0.30], [3, 0.20], [5, 0.15], [4, 0.10], [6, 0.05]]
    assert data["affects"][CLICKED] == [[10, 0.9], [8, 0.4], [11, 0.1]]
    assert data["attends"][0] == [] and data["affects"][S - 1] == []


def test_shade_levels_divide_by_the_largest_magnitude_and_leave_unmeasured_steps_none():
    assert shade_levels([0.5, None, float("nan"), -1.0, 0.25, float("inf")]) == [0.5, None, None, -1.0, 0.25, None]
    assert shade_levels([0.0, 0, None]) == [0.0, 0.0, None]
    assert shade_levels([None, float("nan")]) == [None, None]
    assert shade_levels([]) == []


def test_nan_and_none_reach_the_page_as_null_with_levels_over_the_measured_steps():
    measures = {m["key"]: m for m in payload(render_html(trace_data()))["measures"]}
    resampling, counterfactual = measures["resampling"], measures["counterfactual"]
    assert resampling["values"][-1] is None and resampling["levels"][-1] is None
    assert counterfactual["values"][S - 2] is None and counterfactual["levels"][S - 2] is None
    assert resampling["scale"] == pytest.approx(0.1 * (S - 2))
    assert resampling["levels"][S - 2] == pytest.approx(1.0) and resampling["levels"][0] == 0.0
    assert resampling["label"] == "resampling importance (KL)"
    assert counterfactual["label"] == "counterfactual importance"


ABSENT = {
    "no attention": ({"attention": None}, ["attention"]),
    "no suppression": ({"suppression": None}, ["suppression"]),
    "one measure only": ({"measures": {"forced": [0.5] * S}}, []),
    "no measures, heads or answers": ({"measures": None, "receiver_heads": [], "answer": None, "correct_answer": None},
                                      ["importance measures", "receiver heads", "the answer", "the correct answer"]),
}


@pytest.mark.parametrize("change, named", ABSENT.values(), ids=ABSENT.keys())
def test_a_page_missing_a_part_renders_and_says_what_is_absent(change, named):
    page = render_html({**trace_data(), **change})
    assert len(Elements(page).step_texts) == S
    notice = re.search(r"Not in this file: (.*?)\.</p>", page)
    assert (notice.group(1).split(", ") if notice else []) == named
    data = payload(page)
    assert (data["attends"] is None) == ("attention" in named) and (data["affects"] is None) == ("suppression" in named)


def test_zero_steps_and_only_steps_render():
    page = render_html({"steps": []})
    assert Elements(page).step_texts == {} and "No steps: the reasoning is empty." in page
    assert payload(page) == {"steps": [], "measures": [], "attends": None, "affects": None, "heads": []}
    assert len(Elements(render_html({"steps": ["one", "two"]})).step_texts) == 2


REFUSED = {
    "an unknown key": ({"suppresion": None}, "unknown keys \\['suppresion'\\]"),
    "a measure one value short": ({"measures": {"forced": [0.1] * (S - 1)}}, "11 values for 12 steps"),
    "a non-square matrix": ({"attention": [[0.0] * S] * (S - 1)}, "attention should be 12 x 12"),
    "a text where a number goes": ({"measures": {"forced": ["high"] * S}}, "should be a number or None, got 'high'"),
    "steps out of order": ({"steps": [{"index": 1, "text": "a"}]}, "index = position"),
    "no steps": ({"steps": None}, "needs 'steps'"),
}


@pytest.mark.parametrize("change, message", REFUSED.values(), ids=REFUSED.keys())
def test_data_the_page_does_not_understand_is_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        render_html({**trace_data(), **change})


def test_write_html_makes_the_folder_and_returns_the_path(tmp_path):
    path = write_html(trace_data(), tmp_path / "out" / "anatomy.html")
    assert path == tmp_path / "out" / "anatomy.html"
    assert path.read_text(encoding="utf-8") == render_html(trace_data())


# ---- the page in a real headless browser ---------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    executable = find_browser()
    if executable is None:
        pytest.skip(install_hint())
    session = Browser.start(executable, timeout=30.0)  # every wait below shares this deadline
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def page(browser, tmp_path):
    url = write_html(trace_data(), tmp_path / "page.html").resolve().as_uri()
    browser.open(url)
    return browser, url


def steps_marked(browser: Browser, cls: str) -> list[int]:
    return browser.eval(f"[...document.querySelectorAll('.step.{cls}')].map(e => Number(e.dataset.step))")


def test_the_browser_shows_one_element_per_step_and_runs_none_of_their_text(page):
    browser, _ = page
    assert browser.eval("document.querySelectorAll('#trace .step').length") == S
    assert browser.eval("document.querySelector('.step[data-step=\"2\"]').textContent") == HOSTILE
    assert browser.eval("window.pwned === undefined")


def test_clicking_a_step_shows_the_steps_it_attends_to_and_affects_and_the_receiver_heads(page):
    browser, _ = page
    assert browser.eval("document.querySelectorAll('.step.selected').length") == 0
    browser.click_element(f".step[data-step='{CLICKED}']")
    panel = browser.eval("document.getElementById('panel').innerText")
    assert panel.startswith(f"Step {CLICKED}\n")
    attends = [1, 3, 5, 4, 6]
    affects = [10, 8, 11]
    assert browser.eval("[...document.querySelectorAll('#attends-to li')].map(li => Number(li.dataset.target))") == attends
    assert browser.eval("[...document.querySelectorAll('#affects li')].map(li => Number(li.dataset.target))") == affects
    assert steps_marked(browser, "selected") == [CLICKED]
    assert steps_marked(browser, "attended") == sorted(attends)
    assert steps_marked(browser, "affected") == sorted(affects)
    assert "step 1 (weight 0.300)" in panel and "step 10 (KL 0.900)" in panel
    assert "L12 H5 (kurtosis 8.10)" in panel and "L3 H0" in panel
    assert "resampling importance (KL)\t0.700" in panel  # its value under every measure
    browser.click_element(".step[data-step='0']")
    assert steps_marked(browser, "selected") == [0] and steps_marked(browser, "attended") == []
    assert "no earlier step" in browser.eval("document.getElementById('panel').innerText")


def test_switching_the_measure_changes_the_shading_and_hover_names_unmeasured_steps(page):
    browser, _ = page
    colours = "[...document.querySelectorAll('.step')].map(e => getComputedStyle(e).backgroundColor)"
    titles = "[...document.querySelectorAll('.step')].map(e => e.title)"
    before, titles_before = browser.eval(colours), browser.eval(titles)
    browser.click_element("input[name='measure'][value='1']")
    assert browser.eval("document.querySelector('input[name=\"measure\"]:checked').value") == "1"
    after, titles_after = browser.eval(colours), browser.eval(titles)
    assert before[0] != after[0] and before[-1] != after[-1]
    assert titles_before[-1] == f"step {S - 1} · resampling importance (KL): not measured"
    assert titles_after[S - 2] == f"step {S - 2} · counterfactual importance: not measured"
    assert titles_after[0] == "step 0 · counterfactual importance: 1.00"
    unshaded = "rgba(0, 0, 0, 0)"
    assert before[-1] == unshaded and after[S - 2] == unshaded and after[-1] != unshaded


def test_the_page_asks_the_network_for_nothing_but_itself(page):
    browser, url = page
    browser.click_element(f".step[data-step='{CLICKED}']")
    assert browser.requested_urls() == [url]


@pytest.mark.parametrize("change, named", ABSENT.values(), ids=ABSENT.keys())
def test_a_page_missing_a_part_works_in_the_browser_and_its_panel_says_what_is_absent(browser, tmp_path, change, named):
    browser.open(write_html({**trace_data(), **change}, tmp_path / "page.html").resolve().as_uri())
    browser.click_element(f".step[data-step='{CLICKED}']")
    panel = browser.eval("document.getElementById('panel').innerText")
    expected = {"attention": "attention not given", "suppression": "suppression not given",
                "importance measures": "no importance measure given", "receiver heads": "receiver heads not given"}
    for part, sentence in expected.items():
        assert (sentence in panel) == (part in named), sentence
    assert browser.exceptions() == []


def test_an_empty_trace_loads_without_errors(browser, tmp_path):
    browser.open(write_html({"steps": []}, tmp_path / "page.html").resolve().as_uri())
    assert browser.eval("document.querySelectorAll('.step').length") == 0
    assert "No steps" in browser.eval("document.getElementById('trace').innerText")
    assert browser.exceptions() == []
