"""One self-contained HTML page for a chain of thought: the steps as reading text, shaded by importance.

    write_html(data, "out/anatomy.html")   # open it in any browser; no server, nothing fetched

People read a trace faster than a table. The page shows the reasoning with each step's background
shaded by the chosen importance measure (a switch between the measures present; hover shows the
value). Clicking a step shows, in a side panel, its value under every measure, the earlier steps it
attends to (top `TOP_LINKS` of its attention row), the later steps it causally affects (top of its
suppression row) and the receiver heads; those earlier and later steps are outlined in the text.

`data` (JSON-able; every part but `steps` may be missing or None, and the page says what is absent):

    title, prompt, answer, correct_answer, model: str
    steps: [{"index": i, "text": str, "tokens": [start, end]}, ...]   (or plain strings)
    measures: {name: [float | None per step]}           None / NaN = not measured
    measure_labels: {name: str}
    attention: S x S, row i = mean attention from step i to step j (only j < i is read)
    suppression: S x S, row i = step suppressed, column j = mean KL on step j (only j > i is read)
    receiver_heads: [{"layer": int, "head": int, "kurtosis": float}, ...]

Shading is value / max |value| over the steps, so 0 stays unshaded whatever the other steps hold,
and a negative value (an importance can be negative) is shaded in a second colour.

The data travels as JSON inside `<script type="application/json">` with `<`, `>` and `&` written
as `\\u003c` etc., so no step text (not even one holding `</script>`) can end the script early; the
page builds every string into the document as text, never as markup.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

TOP_LINKS = 5
KEYS = ("title", "prompt", "answer", "correct_answer", "model", "steps", "measures", "measure_labels",
        "attention", "suppression", "receiver_heads")
STEP_KEYS = ("index", "text", "tokens")
HEAD_KEYS = ("layer", "head", "kurtosis")
DEFAULT_LABELS = {
    "resampling": "resampling importance",
    "counterfactual": "counterfactual importance",
    "forced": "forced-answer importance",
    "vertical": "vertical attention score",
}


def render_html(data: dict) -> str:
    """The page for `data` (see the module docstring) as one HTML string with nothing external."""
    payload, absent = _payload(data)
    title = _text(data.get("title"), "title") or "Chain of thought"
    steps = " ".join(
        f'<span class="step" data-step="{i}" tabindex="0">{html.escape(step["text"])}</span>'
        for i, step in enumerate(payload["steps"])
    ) or '<p class="absent">No steps: the reasoning is empty.</p>'
    radios = "\n".join(
        f'<label><input type="radio" name="measure" value="{k}"{" checked" if k == 0 else ""}> '
        f'{html.escape(m["label"])}</label>'
        for k, m in enumerate(payload["measures"])
    ) or '<span class="absent">no importance measure given: steps unshaded</span>'
    return _PAGE.format(
        title=html.escape(title),
        facts=_facts(data),
        absent=f'<p class="absent">Not in this file: {html.escape(", ".join(absent))}.</p>' if absent else "",
        radios=radios,
        steps=steps,
        data=_script_json(payload),
        css=_CSS,
        js=_JS,
    )


def write_html(data: dict, path) -> Path:
    """Write `render_html(data)` to `path` (UTF-8, parent folders made) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path


def shade_levels(values: list) -> list:
    """Each value / max |value| over the finite ones, in [-1, 1]; None and NaN stay None.

    All zeros (or nothing finite) give 0.0 for every finite value: nothing to shade.
    """
    finite = [_number(v, "value") for v in values]
    scale = max((abs(v) for v in finite if v is not None), default=0.0)
    return [None if v is None else (v / scale if scale > 0 else 0.0) for v in finite]


def _payload(data: dict) -> tuple[dict, list[str]]:
    """The JSON the page's script reads, checked against the schema, and the names of what is absent."""
    if not isinstance(data, dict):
        raise TypeError(f"render_html wants a dict (see hookedcot.cot.page), got {type(data).__name__}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the page data; the page reads {list(KEYS)}")
    if data.get("steps") is None:
        raise ValueError("the page data needs 'steps': a list of {'index', 'text', 'tokens'} (may be empty)")
    steps = [_step(s, i) for i, s in enumerate(_list(data["steps"], "steps"))]
    n = len(steps)
    labels = _mapping(data.get("measure_labels"), "measure_labels")
    measures = []
    for name, values in _mapping(data.get("measures"), "measures").items():
        values = [_number(v, f"measures[{name!r}][{i}]") for i, v in enumerate(_list(values, f"measures[{name!r}]"))]
        if len(values) != n:
            raise ValueError(f"measures[{name!r}] has {len(values)} values for {n} steps; "
                             "give one per step (None = not measured)")
        label = _text(labels.get(name), f"measure_labels[{name!r}]") or DEFAULT_LABELS.get(name, str(name))
        measures.append({"key": str(name), "label": label, "values": values, "levels": shade_levels(values),
                         "scale": max((abs(v) for v in values if v is not None), default=None)})
    attention = _matrix(data.get("attention"), n, "attention")
    suppression = _matrix(data.get("suppression"), n, "suppression")
    heads = [_head(h, i) for i, h in enumerate(_list(data.get("receiver_heads") or [], "receiver_heads"))]
    payload = {
        "steps": steps,
        "measures": measures,
        "attends": None if attention is None else [_top(attention[i], range(i)) for i in range(n)],
        "affects": None if suppression is None else [_top(suppression[i], range(i + 1, n)) for i in range(n)],
        "heads": heads,
    }
    absent = [name for name, missing in (
        ("importance measures", not measures), ("attention", attention is None),
        ("suppression", suppression is None), ("receiver heads", not heads),
        ("the answer", data.get("answer") is None), ("the correct answer", data.get("correct_answer") is None),
    ) if missing]
    return payload, absent


def _top(row: list, candidates) -> list:
    """The TOP_LINKS largest [j, value] of `row` over `candidates`, skipping None; ties by j."""
    pairs = [(j, row[j]) for j in candidates if row[j] is not None]
    return [[j, v] for j, v in sorted(pairs, key=lambda p: (-p[1], p[0]))[:TOP_LINKS]]


def _step(step, i: int) -> dict:
    if isinstance(step, str):
        step = {"text": step}
    if not isinstance(step, dict) or not isinstance(step.get("text"), str):
        raise ValueError(f"steps[{i}] should be a dict with a 'text' string, got {step!r}")
    unknown = sorted(set(step) - set(STEP_KEYS))
    if unknown:
        raise ValueError(f"steps[{i}] has unknown keys {unknown}; a step holds {list(STEP_KEYS)}")
    if step.get("index", i) != i:
        raise ValueError(f"steps[{i}] has index {step['index']}; steps must be listed in order, index = position")
    tokens = step.get("tokens")
    if tokens is not None:
        tokens = _list(tokens, f"steps[{i}]['tokens']")
        if len(tokens) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError(f"steps[{i}]['tokens'] should be [start, end] token positions, got {tokens!r}")
    return {"text": step["text"], "tokens": tokens}


def _head(head, i: int) -> dict:
    if not isinstance(head, dict) or any(not isinstance(head.get(k), int) for k in ("layer", "head")):
        raise ValueError(f"receiver_heads[{i}] should be {{'layer': int, 'head': int, 'kurtosis': float}}, got {head!r}")
    unknown = sorted(set(head) - set(HEAD_KEYS))
    if unknown:
        raise ValueError(f"receiver_heads[{i}] has unknown keys {unknown}; a head holds {list(HEAD_KEYS)}")
    kurtosis = _number(head.get("kurtosis"), f"receiver_heads[{i}]['kurtosis']")
    return {"layer": head["layer"], "head": head["head"], "kurtosis": kurtosis}


def _matrix(rows, n: int, name: str) -> list | None:
    if rows is None:
        return None
    rows = _list(rows, name)
    if len(rows) != n or any(len(_list(r, name)) != n for r in rows):
        raise ValueError(f"{name} should be {n} x {n} (one row and one column per step), got {len(rows)} rows "
                         f"of lengths {sorted({len(_list(r, name)) for r in rows})}")
    return [[_number(v, f"{name}[{i}][{j}]") for j, v in enumerate(_list(r, name))] for i, r in enumerate(rows)]


def _mapping(value, name: str) -> dict:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} should be a dict keyed by measure name, got {type(value).__name__}")
    return value or {}


def _list(value, name: str) -> list:
    """A list from a list, tuple or array-like with .tolist() (numpy, torch)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} should be a list, got {type(value).__name__}")
    return list(value)


def _number(value, name: str) -> float | None:
    """A finite float, or None for None / NaN / inf (not measured)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value = value.item() if hasattr(value, "item") else value  # a 0-d numpy / torch number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} should be a number or None, got {value!r} ({type(value).__name__})")
    return float(value) if math.isfinite(value) else None


def _text(value, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} should be a string or None, got {type(value).__name__}")
    return value


def _facts(data: dict) -> str:
    """The header's lines: model, answer against the correct one, and the prompt (folded)."""
    def given(key: str) -> str:
        value = _text(data.get(key), key)
        return html.escape(value) if value is not None else '<span class="absent">not given</span>'

    prompt = _text(data.get("prompt"), "prompt")
    return (
        f"<p><b>model</b> {given('model')} · <b>answer</b> {given('answer')} · "
        f"<b>correct answer</b> {given('correct_answer')}</p>\n"
        + (f"<details><summary>prompt</summary><pre>{html.escape(prompt)}</pre></details>" if prompt is not None
           else '<p><b>prompt</b> <span class="absent">not given</span></p>')
    )


def _script_json(payload: dict) -> str:
    """JSON safe inside <script>: `<`, `>`, `&` only occur in strings, where \\u escapes mean the same."""
    text = json.dumps(payload, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
{facts}
{absent}
<fieldset id="measures"><legend>shade steps by</legend>
{radios}
</fieldset>
<p id="legend"></p>
</header>
<main>
<article id="trace">{steps}</article>
<aside id="panel"><p class="hint">Click a step to see what it attends to and what it affects.</p></aside>
</main>
<script type="application/json" id="cot-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

_CSS = """
body { margin: 0; font: 15px/1.5 system-ui, sans-serif; color: #1f2328; background: #fff; }
header { padding: 0.8rem 1.5rem; border-bottom: 1px solid #d0d7de; }
h1 { font-size: 1.3rem; margin: 0 0 0.4rem; }
header p { margin: 0.3rem 0; }
pre { white-space: pre-wrap; background: #f6f8fa; padding: 0.5rem; margin: 0.3rem 0; }
fieldset { border: none; padding: 0; margin: 0.5rem 0 0; }
fieldset legend { float: left; margin-right: 0.8rem; font-weight: bold; }
fieldset label { margin-right: 1rem; cursor: pointer; }
.absent, .hint, .muted, #legend { color: #6e7781; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 24rem; gap: 1.5rem; padding: 1rem 1.5rem; }
@media (max-width: 800px) { main { grid-template-columns: 1fr; } }
#trace { white-space: pre-wrap; font: 17px/1.9 Georgia, serif; }
.step { cursor: pointer; border-radius: 3px; padding: 1px 1px; outline-offset: 1px;
        -webkit-box-decoration-break: clone; box-decoration-break: clone; }
.step::before { content: attr(data-step); font: 10px/1 system-ui, sans-serif; color: #8c959f;
                vertical-align: super; margin-right: 2px; }
.step:hover { outline: 1px solid #8c959f; }
.step.unmeasured { text-decoration: underline dashed #afb8c1; }
.step.selected { outline: 2px solid #1f2328; }
.step.attended { outline: 2px solid #0969da; }
.step.affected { outline: 2px dashed #8250df; }
#panel { position: sticky; top: 1rem; align-self: start; max-height: calc(100vh - 2rem); overflow: auto;
         border-left: 1px solid #d0d7de; padding-left: 1rem; }
#panel h2 { font-size: 1.1rem; margin: 0; }
#panel h3 { font-size: 0.95rem; margin: 0.9rem 0 0.2rem; }
#panel blockquote { margin: 0.4rem 0; padding-left: 0.6rem; border-left: 3px solid #d0d7de; white-space: pre-wrap; }
#panel ul { margin: 0; padding-left: 1.1rem; }
#panel li[data-target] { cursor: pointer; }
#attends-to li::marker { color: #0969da; }
#affects li::marker { color: #8250df; }
table { border-collapse: collapse; } td { padding: 0 0.6rem 0 0; }
"""

_JS = r"""
(() => {
  const data = JSON.parse(document.getElementById('cot-data').textContent);
  const steps = Array.from(document.querySelectorAll('#trace .step'));
  const panel = document.getElementById('panel');
  let measure = data.measures.length ? 0 : -1;
  let selected = -1;
  const fmt = v => (v === null ? 'not measured' : Number(v).toPrecision(3));
  const colour = level => {
    const alpha = (0.75 * Math.abs(level)).toFixed(3);
    return level >= 0 ? `rgba(230, 97, 1, ${alpha})` : `rgba(33, 102, 172, ${alpha})`;
  };
  const node = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  const clip = text => (text.length > 90 ? text.slice(0, 89) + '…' : text);

  function shade() {
    const m = data.measures[measure];
    steps.forEach((el, i) => {
      const level = m ? m.levels[i] : null;
      el.classList.toggle('unmeasured', Boolean(m) && level === null);
      el.style.backgroundColor = level === null ? '' : colour(level);
      el.title = `step ${i}` + (m ? ` · ${m.label}: ${fmt(m.values[i])}` : '');
    });
    document.getElementById('legend').textContent = m
      ? (m.scale === null ? `${m.label}: no step measured.`
         : `Shade: value ÷ ${Number(m.scale).toPrecision(3)}, the largest |value| over the steps; orange positive, ` +
           `blue negative; dashed underline: not measured. Hover a step for its value.`)
      : '';
  }

  function links(title, id, rows, i, cls, absent, none, what) {
    panel.append(node('h3', title));
    if (rows === null) { panel.append(node('p', absent, 'absent')); return; }
    if (!rows[i].length) { panel.append(node('p', none, 'muted')); return; }
    const list = node('ul'); list.id = id;
    for (const [j, v] of rows[i]) {
      const li = node('li', `step ${j} (${what} ${Number(v).toPrecision(3)}): ${clip(data.steps[j].text)}`);
      li.dataset.target = j;
      list.append(li);
      steps[j].classList.add(cls);
    }
    panel.append(list);
  }

  function select(i) {
    selected = i;
    steps.forEach(s => s.classList.remove('selected', 'attended', 'affected'));
    panel.replaceChildren();
    if (i < 0) { panel.append(node('p', 'Click a step to see what it attends to and what it affects.', 'hint')); return; }
    steps[i].classList.add('selected');
    panel.append(node('h2', `Step ${i}`));
    const tokens = data.steps[i].tokens;
    if (tokens) panel.append(node('p', `tokens ${tokens[0]}–${tokens[1]}`, 'muted'));
    panel.append(node('blockquote', data.steps[i].text));
    panel.append(node('h3', 'Importance'));
    if (!data.measures.length) panel.append(node('p', 'no importance measure given', 'absent'));
    else {
      const table = node('table'); table.id = 'values';
      for (const m of data.measures) {
        const row = node('tr');
        row.append(node('td', m.label), node('td', fmt(m.values[i])));
        table.append(row);
      }
      panel.append(table);
    }
    links('Attends to (earlier steps, receiver-head attention)', 'attends-to', data.attends, i, 'attended',
          'attention not given', 'no earlier step', 'weight');
    links('Affects (later steps, suppression KL)', 'affects', data.affects, i, 'affected',
          'suppression not given', 'no later step measured', 'KL');
    panel.append(node('h3', 'Receiver heads'));
    if (!data.heads.length) { panel.append(node('p', 'receiver heads not given', 'absent')); return; }
    const heads = node('ul'); heads.id = 'heads';
    for (const h of data.heads)
      heads.append(node('li', `L${h.layer} H${h.head}` + (h.kurtosis === null ? '' : ` (kurtosis ${fmt(h.kurtosis)})`)));
    panel.append(heads);
  }

  document.getElementById('trace').addEventListener('click', e => {
    const step = e.target.closest('.step');
    if (step) select(Number(step.dataset.step));
  });
  document.getElementById('trace').addEventListener('keydown', e => {
    const step = e.target.closest('.step');
    if (step && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); select(Number(step.dataset.step)); }
  });
  document.addEventListener('keydown', e => { if (e.key === 'Escape') select(-1); });
  panel.addEventListener('click', e => {
    const li = e.target.closest('li[data-target]');
    if (li) { select(Number(li.dataset.target)); steps[selected].scrollIntoView({block: 'nearest'}); }
  });
  document.querySelectorAll('input[name="measure"]').forEach(r => r.addEventListener('change', () => {
    measure = Number(r.value); shade();
  }));
  shade();
})();
"""
