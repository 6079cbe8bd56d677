"""Reports of per-token distillation signals (`analyze_style`, Figure 1a): statistics per
decoded token string, the markdown tables and the coloured-response PNG.

`signals` is the dict `analyze_style.collect_signals` returns: token_ids / e_c / e_ctr / mask
[R', T] over the kept rollouts, rewards / rows [R'], source, message.
"""

from __future__ import annotations

import os

import numpy as np

SIGNALS = ("e_c", "e_ctr")
SIGNAL_TITLES = {
    "e_c": "e_c = lp_T(y | correct hint) − lp_S(y)",
    "e_ctr": "e_ctr = lp_T(y | correct hint) − log mean_k p_T(y | wrong hint k)   (RLCSD)",
}


# ---------------------------------------------------------------------------------------------
# Aggregation per token string
# ---------------------------------------------------------------------------------------------

def token_strings(tokenizer, ids) -> list[str]:
    """Each id decoded on its own (special tokens kept: the EOS is a response token too)."""
    cache: dict[int, str] = {}
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i not in cache:
            cache[i] = tokenizer.decode([int(i)], skip_special_tokens=False)
        out.append(cache[i])
    return out


def token_stats(signals: dict, tokenizer, *, min_count: int = 3) -> list[dict]:
    """Per decoded token string over every response token of the kept rollouts:
    {token, count, mean_abs_e_c, mean_e_c, mean_abs_e_ctr, mean_e_ctr} (NaN e_ctr when it is
    unavailable), for tokens seen at least `min_count` times; sorted by count, then token."""
    mask = np.asarray(signals["mask"]) > 0
    if not mask.any():
        return []
    strings = token_strings(tokenizer, np.asarray(signals["token_ids"])[mask])
    e_c = np.asarray(signals["e_c"], np.float64)[mask]
    e_ctr = np.asarray(signals["e_ctr"], np.float64)[mask]
    groups: dict[str, list[int]] = {}
    for j, s in enumerate(strings):
        groups.setdefault(s, []).append(j)
    out = []
    for s, idx in groups.items():
        if len(idx) < min_count:
            continue
        c, r = e_c[idx], e_ctr[idx]
        out.append(dict(token=s, count=len(idx), mean_abs_e_c=float(np.abs(c).mean()),
                        mean_e_c=float(c.mean()), mean_abs_e_ctr=float(np.abs(r).mean()),
                        mean_e_ctr=float(r.mean())))
    out.sort(key=lambda d: (-d["count"], d["token"]))
    return out


def top_tokens(signals: dict, tokenizer, *, by: str = "e_ctr", k: int = 10,
               min_count: int = 3, stats: list[dict] | None = None) -> list[dict]:
    """The `k` tokens with the largest mean |signal| (`by` = "e_c" or "e_ctr"); ties by count.
    Empty when the signal is unavailable (e_ctr without any wrong hint)."""
    if by not in SIGNALS:
        raise ValueError(f"by={by!r}; allowed: {', '.join(SIGNALS)}")
    stats = token_stats(signals, tokenizer, min_count=min_count) if stats is None else stats
    key = f"mean_abs_{by}"
    rows = [d for d in stats if np.isfinite(d[key])]
    return sorted(rows, key=lambda d: (-d[key], -d["count"], d["token"]))[:k]


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def display_token(s: str, *, space: str = "␣") -> str:
    """A visible, one-line form of a token string (spaces, newlines, control bytes)."""
    out = []
    for ch in s:
        if ch == " ":
            out.append(space)
        elif ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or 127 <= ord(ch) < 160:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _md_token(s: str) -> str:
    shown = display_token(s).replace("|", "\\|") or "(empty)"
    tick = "``" if "`" in shown else "`"
    pad = " " if "`" in shown else ""
    return f"{tick}{pad}{shown}{pad}{tick}"


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.4f}"


def render_table(top_c: list[dict], top_ctr: list[dict], *, source: str = "",
                 message: str = "", num_rollouts: int = 0, num_kept: int = 0,
                 num_tokens: int = 0, min_count: int = 3) -> str:
    """Markdown: a header paragraph and two tables (top by mean |e_c|, top by mean |e_ctr|)."""
    summary = (f"Hint source: **{source}**. Kept {num_kept} of {num_rollouts} rollouts, "
               f"{num_tokens} response tokens; tokens seen fewer than {min_count} times are "
               "left out.")
    lines = ["# Token-level distillation signals (Figure 1a)", "", summary, ""]
    if message:
        lines += [f"Note: {message}.", ""]
    lines += [f"`{SIGNAL_TITLES['e_c']}`  ", f"`{SIGNAL_TITLES['e_ctr']}`", ""]
    header = ("| rank | token | count | mean \\|e_c\\| | mean e_c | mean \\|e_ctr\\| "
              "| mean e_ctr |")
    for by, top in (("e_c", top_c), ("e_ctr", top_ctr)):
        lines += [f"## Top-{len(top) if top else 10} tokens by mean |{by}|", "", header,
                  "|---:|:---|---:|---:|---:|---:|---:|"]
        for i, d in enumerate(top, 1):
            lines.append(f"| {i} | {_md_token(d['token'])} | {d['count']} | "
                         f"{_fmt(d['mean_abs_e_c'])} | {_fmt(d['mean_e_c'])} | "
                         f"{_fmt(d['mean_abs_e_ctr'])} | {_fmt(d['mean_e_ctr'])} |")
        if not top:
            why = ("no wrong hint exists, so the contrast is undefined" if by == "e_ctr"
                   and num_kept else f"no token reached {min_count} occurrences"
                   if num_kept else "no rollout survived")
            lines.append(f"| – | ({why}) | 0 | n/a | n/a | n/a | n/a |")
        lines.append("")
    return "\n".join(lines)


def pick_row(signals: dict) -> int:
    """Index (into the kept rows) of the response to draw: the first correct one, else the
    first kept one."""
    rewards = np.asarray(signals["rewards"])
    if not len(rewards):
        raise ValueError("no kept rollout to draw")
    correct = np.nonzero(rewards > 0)[0]
    return int(correct[0]) if len(correct) else 0


def _layout(strings: list[str], width: int):
    """(x, line, w) in character cells per token; a newline token ends its line."""
    cells, x, line = [], 0, 0
    for s in strings:
        w = max(len(s), 1)
        if x and x + w > width:
            x, line = 0, line + 1
        cells.append((x, line, w))
        x += w
        if s.endswith("⏎"):
            x, line = 0, line + 1
    return cells, (line + 1 if x else max(line, 1))


def render_png(signals: dict, tokenizer, out: str, *, row: int = -1, max_tokens: int = 200,
               width: int = 90) -> str:
    """Draw kept response `row` (-1: `pick_row`) with each token on a box coloured by e_c
    (top panel) and e_ctr (bottom panel); diverging colormap centred at 0, one scale per
    signal (its 99th percentile of |value| over the whole batch).  Returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors as mcolors
    from matplotlib.patches import Rectangle

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    mask = np.asarray(signals["mask"]) > 0
    if not mask.any():
        fig = plt.figure(figsize=(8, 1.6))
        fig.text(0.5, 0.5, "no rollout survived the hint filter; nothing to draw\n"
                 + signals.get("message", "")[:200], ha="center", va="center", fontsize=9,
                 wrap=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out
    row = pick_row(signals) if row < 0 else row
    length = int(mask[row].sum())
    shown = min(length, max_tokens)
    raw = token_strings(tokenizer, np.asarray(signals["token_ids"])[row, :shown])
    strings = [display_token(s, space=" ") for s in raw]
    cells, n_lines = _layout(strings, width)
    char_in, line_in, fs = 0.075, 0.24, 8.5
    text_w = width * char_in
    panel_h = max(n_lines * line_in, 0.6) + 0.45
    fig_w, fig_h = text_w + 1.6, 2 * panel_h + 0.7
    fig = plt.figure(figsize=(fig_w, fig_h))
    cmap = plt.get_cmap("RdBu_r")
    reward = float(np.asarray(signals["rewards"])[row])
    fig.suptitle(f"rollout {int(np.asarray(signals['rows'])[row])} (reward {reward:g}), "
                 f"hint source {signals.get('source', '?')}; first {shown} of {length} tokens",
                 fontsize=9, y=1 - 0.12 / fig_h)
    for p, name in enumerate(SIGNALS):
        values = np.asarray(signals[name], np.float64)
        bottom = (fig_h - 0.45 - (p + 1) * panel_h) / fig_h
        ax = fig.add_axes([0.3 / fig_w, bottom, text_w / fig_w, (panel_h - 0.4) / fig_h])
        cax = fig.add_axes([(0.45 + text_w) / fig_w, bottom, 0.12 / fig_w,
                            (panel_h - 0.4) / fig_h])
        ax.set_xlim(0, width)
        ax.set_ylim(max(n_lines, (panel_h - 0.4) / line_in), 0)   # 1 unit = 1 line
        ax.axis("off")
        finite = np.isfinite(values[mask])
        ax.set_title(SIGNAL_TITLES[name] + ("" if finite.any() else
                                            "   — n/a: no wrong hint in this batch"),
                     fontsize=8.5, loc="left")
        vmax = float(np.percentile(np.abs(values[mask][finite]), 99)) if finite.any() else 1.0
        norm = mcolors.Normalize(-max(vmax, 1e-6), max(vmax, 1e-6))
        for (x, line, w), s, v in zip(cells, strings, values[row, :shown]):
            face = cmap(norm(v)) if np.isfinite(v) else (0.85, 0.85, 0.85, 1.0)
            ax.add_patch(Rectangle((x, line + 0.06), w, 0.88, facecolor=face,
                                   edgecolor="white", linewidth=0.4))
            dark = np.isfinite(v) and abs(norm(v) - 0.5) > 0.35
            ax.text(x + w / 2, line + 0.5, s, ha="center", va="center", fontsize=fs,
                    family="DejaVu Sans Mono", color="white" if dark else "black")
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        cax.tick_params(labelsize=7)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
