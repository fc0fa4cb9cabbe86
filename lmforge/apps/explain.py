"""`lmforge explain`: where a model looks and how surprised it is, token by token, for one text.

One forward pass over the text gives
- the attention weights of every layer and head: softmax(q k^T * scale + causal mask), recomputed in a hook from
  the very queries and keys the block's attention uses (`Attention.project`: after q/k norms and RoPE; with
  grouped-query attention each query head uses its group's key head) by the layer's own `Attention.weights` (its
  scale, soft-cap and sliding window), which is what F.scaled_dot_product_attention computes inside without
  returning it (tests/test_explain.py checks weights @ V against the model's own attention output);
- for every token after the first, the model's probability of it given the tokens before (softmax of the logits
  at the previous position), its surprisal -log2 p in bits, and the top-k alternatives.

Written to the output folder (atomically, file by file):
  explain.json           the numbers: tokens, probabilities, surprisals, top-k, and the attention when it is small
  attention.npy          attention weights, float32 (n_layer, n_head, T, T): row = query token, column = key token
  attention_layer{i}.png one grid of heatmaps per layer, a panel per head, token labels on the axes
  tokens.html            standalone page (inline CSS and JS): tokens coloured by surprisal; hover shows p, bits and
                         the alternatives; clicking a token shows what it attends to in the chosen layer and head
and a coloured per-token view goes to the terminal (rich when installed, else ANSI colours).
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.fsutil import atomic_write_bytes, atomic_write_text

MAX_JSON_ATTENTION = 1_000_000  # attention numbers inlined in explain.json and tokens.html at most
MAX_BITS = 16.0  # surprisals at or above this get the hottest colour


@dataclass
class TokenInfo:
    """One token of the text and what the model predicted for it (prob None for the first, which nothing
    precedes)."""

    index: int
    id: int
    text: str
    prob: float | None = None
    surprisal_bits: float | None = None
    top: list[dict] = field(default_factory=list)  # [{"id", "text", "prob"}], most likely first


# ---------------------------------------------------------------------------------- the forward pass


@torch.inference_mode()
def forward_with_attention(model, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (T, V) float32, attention (n_layer, n_head, T, T) float32) of one uncached pass over tokens."""
    captured: dict[int, torch.Tensor] = {}

    def hook(attn, args):
        x, layer, rope = args[0], args[1], args[2]  # Attention.forward(x, layer, rope, cache, mask, is_causal)
        q, k, _ = attn.project(x, rope)
        captured[layer] = attn.weights(q.float(), k.float())[0]  # causal, with the layer's window and soft-cap

    handles = [block.attn.register_forward_pre_hook(hook) for block in model.blocks]
    try:
        device = next(model.parameters()).device
        logits = model(torch.tensor([list(tokens)], device=device))[0].float()
    finally:
        for h in handles:
            h.remove()
    return logits, torch.stack([captured[i] for i in range(len(model.blocks))])


def token_infos(logits: torch.Tensor, tokens: Sequence[int], decode, top_k: int) -> list[TokenInfo]:
    """Per token: p(token | tokens before) = softmax(logits[t - 1])[token], its surprisal in bits, the top_k."""
    logp = logits.float().log_softmax(dim=-1)  # surprisal from log-probabilities: finite even where p underflows
    infos = [TokenInfo(0, int(tokens[0]), decode([tokens[0]]))]
    for t in range(1, len(tokens)):
        row = logp[t - 1]
        lp = float(row[tokens[t]])
        top_lp, top_ids = row.topk(min(top_k, row.numel()))
        top = [{"id": int(i), "text": decode([int(i)]), "prob": math.exp(v)} for v, i in zip(top_lp.tolist(), top_ids)]
        infos.append(TokenInfo(t, int(tokens[t]), decode([tokens[t]]), math.exp(lp), -lp / math.log(2), top))
    return infos


# ---------------------------------------------------------------------------------- colours


def heat(bits: float | None) -> tuple[int, int, int]:
    """Background colour for a surprisal: pale green (expected) through yellow to red (surprising)."""
    if bits is None:
        return (225, 225, 225)
    x = min(max(bits, 0.0), MAX_BITS) / MAX_BITS
    stops = [(0.0, (198, 239, 206)), (0.5, (255, 235, 132)), (1.0, (244, 107, 96))]
    for (x0, c0), (x1, c1) in zip(stops, stops[1:]):
        if x <= x1:
            f = (x - x0) / (x1 - x0)
            return tuple(round(a + f * (b - a)) for a, b in zip(c0, c1))
    return stops[-1][1]


def visible(text: str, token_id: int | None = None) -> str:
    """A token's text with newlines and tabs shown; a token that decodes to nothing (BOS) shows as <id>."""
    if not text and token_id is not None:
        return f"<{token_id}>"
    return text.replace("\n", "\u21b5").replace("\t", "\u2192")


# ---------------------------------------------------------------------------------- outputs


def print_tokens(infos: list[TokenInfo], out=None) -> None:
    """The text in the terminal, each token on its surprisal colour, then a short summary."""
    try:
        from rich.console import Console
        from rich.text import Text
    except ImportError:
        Console = None
    scored = [i.surprisal_bits for i in infos if i.surprisal_bits is not None]
    summary = (
        f"{len(infos)} tokens; mean surprisal {sum(scored) / len(scored):.2f} bits; perplexity "
        f"{2 ** (sum(scored) / len(scored)):.2f}"
        if scored
        else f"{len(infos)} token(s); nothing scored"
    )
    if Console is not None:
        text = Text()
        for info in infos:
            text.append(visible(info.text, info.id), style="black on rgb({},{},{})".format(*heat(info.surprisal_bits)))
        console = Console(file=out, highlight=False)
        console.print(text)
        console.print(summary + " (green: expected, red: surprising)")
        return
    parts = ["\x1b[30;48;2;{};{};{}m{}\x1b[0m".format(*heat(i.surprisal_bits), visible(i.text, i.id)) for i in infos]
    print("".join(parts), file=out)
    print(summary + " (green: expected, red: surprising)", file=out)


def heatmap_png(attention: np.ndarray, labels: list[str], layer: int) -> bytes:
    """One layer's heads as a grid of heatmaps (query rows, key columns), PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, T = attention.shape[0], attention.shape[-1]
    cols = min(H, 4)
    rows = -(-H // cols)
    size = max(3.0, min(0.18 * T, 10.0))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1, rows * size + 0.6), squeeze=False)
    show = T <= 64  # more labels than that are unreadable
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(attention[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer} head {h}", fontsize=9)
        if show:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels, fontsize=6)
        else:
            ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    fig.supxlabel("key (attended) token"), fig.supylabel("query token")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge explain: __TITLE__</title>
<style>
body { font: 15px/1.9 system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
#text { white-space: pre-wrap; font-family: ui-monospace, monospace; }
.tok { border-radius: 3px; padding: 1px 0; cursor: pointer; }
.tok.sel { outline: 2px solid #2255cc; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #999; border-radius: 4px;
       padding: 6px 10px; font: 13px/1.5 system-ui, sans-serif; box-shadow: 0 2px 8px rgba(0,0,0,.2); }
#tip table { border-collapse: collapse; } #tip td { padding: 0 6px; }
.legend span { display: inline-block; width: 2.2em; text-align: center; font-size: 12px; }
#att { margin-top: 1.5em; }
</style></head><body>
<h2>__TITLE__</h2>
<p>__SUMMARY__</p>
<p class="legend">surprisal (bits): __LEGEND__</p>
<div id="text">__TOKENS__</div>
<div id="att"></div>
<div id="tip"></div>
<script type="application/json" id="lmforge-data">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("lmforge-data").textContent);
const tip = document.getElementById("tip");
const esc = s => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const show = s => esc(s.replace(/\\n/g, "\\u21b5"));
document.querySelectorAll(".tok").forEach(el => {
  el.addEventListener("mousemove", ev => {
    const t = data.tokens[+el.dataset.i];
    let body = `<b>${show(JSON.stringify(t.text))}</b> (id ${t.id})<br>`;
    if (t.prob === null) body += "first token: nothing precedes it";
    else {
      body += `p = ${t.prob.toPrecision(4)}, surprisal = ${t.surprisal_bits.toFixed(2)} bits<br><table>`;
      for (const a of t.top)
        body += `<tr><td>${show(JSON.stringify(a.text))}</td><td>${a.prob.toPrecision(3)}</td></tr>`;
      body += "</table>";
    }
    tip.innerHTML = body; tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX + 14, innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  });
  el.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  el.addEventListener("click", () => attend(+el.dataset.i));
});
const att = document.getElementById("att");
let query = null;
function attend(i) {
  query = i;
  document.querySelectorAll(".tok").forEach(e => e.classList.toggle("sel", +e.dataset.i === i));
  paint();
}
function paint() {
  if (!data.attention) return;
  const l = +document.getElementById("layer").value, h = +document.getElementById("head").value;
  document.querySelectorAll(".tok").forEach(e => {
    const j = +e.dataset.i;
    if (query === null) { e.style.background = e.dataset.bg; return; }
    const w = j <= query ? data.attention[l][h][query][j] : 0;
    e.style.background = `rgba(34, 85, 204, ${Math.min(1, w * 1.5).toFixed(3)})`;
  });
}
if (data.attention) {
  const opts = n => Array.from({length: n}, (_, i) => `<option>${i}</option>`).join("");
  att.innerHTML = `Click a token to see what it attends to: layer <select id="layer">${opts(data.attention.length)}` +
    `</select> head <select id="head">${opts(data.attention[0].length)}</select> ` +
    `<button id="reset">back to surprisal</button>`;
  document.getElementById("layer").onchange = paint;
  document.getElementById("head").onchange = paint;
  document.getElementById("reset").onclick = () => { query = null; attend(null); };
} else {
  att.textContent = "Attention is too large to inline here; see attention.npy and the PNG heatmaps.";
}
</script></body></html>
"""


def html_page(title: str, infos: list[TokenInfo], summary: str, attention: list | None) -> str:
    """The standalone page: every token a span with data-p / data-bits, all numbers also in a JSON block."""
    spans = []
    for info in infos:
        rgb = "rgb({},{},{})".format(*heat(info.surprisal_bits))
        p = "" if info.prob is None else f' data-p="{info.prob!r}" data-bits="{info.surprisal_bits!r}"'
        spans.append(
            f'<span class="tok" data-i="{info.index}" data-id="{info.id}"{p} data-bg="{rgb}" '
            f'style="background:{rgb}">{html.escape(info.text or visible("", info.id))}</span>'
        )
    legend = "".join(
        '<span style="background:rgb({},{},{})">{:g}</span>'.format(*heat(b), b)
        for b in (0, 2, 4, 6, 8, 10, 12, 14, 16)
    )
    data = json.dumps({"tokens": [asdict(i) for i in infos], "attention": attention}, ensure_ascii=False)
    page = HTML_PAGE
    for key, value in (
        ("__TITLE__", html.escape(title)),
        ("__SUMMARY__", html.escape(summary)),
        ("__LEGEND__", legend),
        ("__TOKENS__", "".join(spans)),
        ("__DATA__", data.replace("</", "<\\/")),
    ):
        page = page.replace(key, value)
    return page


# ---------------------------------------------------------------------------------- the command


def explain(
    model,
    tokenizer,
    text: str,
    out: str | Path,
    *,
    top_k: int = 5,
    bos: bool = True,
    heatmaps: bool = True,
    title: str = "",
    terminal=None,
) -> dict:
    """Run the model once over `text` and write the explanation files into `out`; returns explain.json's dict.

    Args:
        model: an lmforge Transformer (eval mode).
        tokenizer: its tokenizer.
        text: the text to explain.
        out: output folder (created).
        top_k: alternatives listed per token.
        bos: start with the tokenizer's BOS token (else its EOS, GPT-2's document separator) when it has one, so
            the text's first token is scored too.
        heatmaps: write the PNG heatmaps (matplotlib).
        title: the page title (default: the start of the text).
        terminal: where the coloured view goes (default stdout; False for none).
    """
    if not text:
        raise ValueError("explain needs a non-empty text (--text or --file)")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    tokens = tokenizer.encode(text)
    start = getattr(tokenizer, "bos_id", None)
    start = start if start is not None else getattr(tokenizer, "eos_id", None)
    if bos and start is not None and tokens[:1] != [start]:  # (some tokenizers, like llama2.c's, add it already)
        tokens = [start] + tokens
    if not tokens:
        raise ValueError(f"the text {text[:40]!r} encodes to no tokens")
    c = model.config
    if c.pos != "sinusoidal" and len(tokens) > c.block_size:
        raise ValueError(f"the text is {len(tokens)} tokens but the model's context is {c.block_size}; shorten it")
    logits, attention = forward_with_attention(model, tokens)
    infos = token_infos(logits, tokens, tokenizer.decode, top_k)
    att = attention.cpu().numpy().astype(np.float32)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scored = [i.surprisal_bits for i in infos if i.surprisal_bits is not None]
    mean = sum(scored) / len(scored) if scored else None
    inline = att.tolist() if att.size <= MAX_JSON_ATTENTION else None
    result = {
        "text": text,
        "bos": bool(start is not None and tokens[0] == start),
        "n_layer": att.shape[0],
        "n_head": att.shape[1],
        "tokens": [asdict(i) for i in infos],
        "mean_surprisal_bits": mean,
        "perplexity": 2**mean if mean is not None else None,
        "attention_file": "attention.npy",
        "attention_shape": list(att.shape),
        "attention": inline,
    }
    buf = io.BytesIO()
    np.save(buf, att)
    atomic_write_bytes(out / "attention.npy", buf.getvalue())
    atomic_write_text(out / "explain.json", json.dumps(result, ensure_ascii=False, allow_nan=False, default=str))
    summary = (
        f"{len(infos)} tokens, mean surprisal {mean:.2f} bits (perplexity {2**mean:.2f}); hover a token "
        f"for its probability and the alternatives"
        if mean is not None
        else f"{len(infos)} token(s)"
    )
    title = title or (text[:60] + ("..." if len(text) > 60 else ""))
    atomic_write_text(out / "tokens.html", html_page(title, infos, summary, inline))
    if heatmaps:
        labels = [visible(i.text, i.id) for i in infos]
        for layer in range(att.shape[0]):
            atomic_write_bytes(out / f"attention_layer{layer:02d}.png", heatmap_png(att[layer], labels, layer))
    if terminal is not False:
        print_tokens(infos, terminal)
    return result


def explain_command(
    model: str,
    text: str = "",
    file: str | None = None,
    out: str = "explain",
    top_k: int = 5,
    bos: bool = True,
    heatmaps: bool = True,
    tokenizer: str | None = None,
) -> int:
    """Explain a model's reading of a text: attention heatmaps per layer and head, and per-token surprisal.

    Args:
        model: model folder, Hugging Face folder or llama2.c file (or a preset name with --tokenizer).
        text: the text to explain.
        file: read the text from this file instead.
        out: output folder for explain.json, attention.npy, attention_layerNN.png and tokens.html.
        top_k: alternatives shown per token.
        bos: prepend the tokenizer's BOS (or EOS) token so that the first token is scored too.
        heatmaps: write the PNG attention heatmaps (--no-heatmaps skips them, which is faster for big models).
        tokenizer: tokenizer.json or folder to use instead of the model folder's own.
    """
    from lmforge.loader import load

    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    if not text:
        raise ValueError("give the text to explain with --text TEXT or --file PATH")
    loaded = load(model, dtype="float32", tokenizer=tokenizer)
    net, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise ValueError(f"{model} has no tokenizer; pass --tokenizer PATH")
    result = explain(net, tok, text, out, top_k=top_k, bos=bos, heatmaps=heatmaps, title=Path(model).name)
    pngs = f", attention_layer00..{result['n_layer'] - 1:02d}.png" if heatmaps else ""
    print(f"wrote {out}/explain.json, attention.npy, tokens.html{pngs}")
    return 0
