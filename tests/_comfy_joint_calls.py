"""The node's result on recorded joint calls ([B, heads, L, d], skip_reshape) whose text keys and image queries sit
at given slices of the joint tokens (Mochi: [video; text]; AuraFlow: [registers; text; image]), computed
independently of the node: the stand-in's backend, except the image queries of the positive rows, which come from
the explicit fp32 softmax with the image × text block bent by bending.bend_probs."""

import torch
from torch.testing import assert_close

import comfy_standin as cs
from ckptbend.runtime import bending, comfy_host


def explicit(call, rows, entries, columns, text, queries, grid, step):
    q, k, v = call["q"], call["k"], call["v"]
    heads = q.shape[1]
    out = cs.attention_chunked(q, k, v, heads, skip_reshape=True).clone()
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[rows]
    block = probs[:, :, queries, text]
    n_q, n_t = block.shape[-2:]
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    frames, h, w = grid
    bent = bending.bend_probs(block.reshape(-1, n_q, n_t), columns, (h, w), unrowed, step, call["layer"],
                              frames=frames if frames > 1 else None)
    probs[:, :, queries, text] = bent.view(len(rows), heads, n_q, n_t)
    image = probs[:, :, queries]
    if any(e["renormalize"] == "row" for e in entries):
        image = image / image.sum(-1, keepdim=True)
    image = (image @ v[rows].float()).transpose(1, 2).flatten(2)
    for i, r in enumerate(rows):
        out[r, queries] = image[i].to(out.dtype)
    return out


def check_calls(record, entries, columns, text, queries, grid, step):
    """Every recorded call: the backend's output bit for bit where nothing acts (an entry's other layers, the text
    or register queries, negative chunks), the explicit bent result at the positive image queries. Returns the
    largest change bending made and the number of bent calls."""
    changed, bent = 0.0, 0
    for call in record:
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], call["q"].shape[1], skip_reshape=True)
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, call["q"].shape[0])
        if not active or not rows:
            assert torch.equal(call["out"], plain), call["layer"]
            continue
        expected = explicit(call, rows, active, columns, text, queries, grid, step)
        assert_close(call["out"], expected, rtol=1e-4, atol=1e-5, msg=f"layer {call['layer']}")
        others = [r for r in range(call["q"].shape[0]) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])                       # negative chunks
        kept = [j for j in range(plain.shape[1]) if j not in range(plain.shape[1])[queries]]
        assert torch.equal(call["out"][:, kept], plain[:, kept])                       # text / register queries
        changed, bent = max(changed, float((call["out"] - plain).abs().max())), bent + 1
    return changed, bent
