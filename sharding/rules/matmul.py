"""Contractions (mm, bmm, `fp::batched_matmul` over any batch dims) as einsum letters: shards on a
kept letter carry to the output, shards on the contracted letter on both sides give a Partial,
conflicts move the non-anchor."""
from __future__ import annotations

import torch

from ..batched_matmul import BATCHED_MATMUL, LEADING_CONTRACT, LEADING_MATMUL
from ..layout import Strided, split_dim
from . import Choice, handles_strided, rule
from .choose import PARTIAL, REPLICATE, anchor, is_shard

aten = torch.ops.aten

EQUATIONS = {
    aten.mm.default: ("mk", "kn", "mn"),
    aten.bmm.default: ("bmk", "bkn", "bmn"),
}


def _letter(spec: str, placement):
    return spec[placement] if is_shard(placement) else placement


def _strided_contraction(ctx, axis, a, b, spec_a, spec_b, spec_out):
    """A chunked split on one letter: kept letters carry it, a contracted or batch letter needs the
    other operand chunked alike; anything else sees the chunked operand whole."""
    strided, other = (a, b) if isinstance(ctx.placement(a, axis), Strided) else (b, a)
    spec_s, spec_o = (spec_a, spec_b) if strided is a else (spec_b, spec_a)
    ps, po = ctx.placement(strided, axis), ctx.placement(other, axis)
    letter = spec_s[ps.dim]
    if letter in spec_o:  # contracted or batch: the other operand splits the same letter the same way
        wanted = Strided(spec_o.index(letter), ps.chunks)
        if po in (REPLICATE, wanted):
            out = PARTIAL if letter not in spec_out else Strided(spec_out.index(letter), ps.chunks)
            return Choice(out, {other: wanted})
    elif po in (REPLICATE, PARTIAL):  # a kept letter of the chunked operand only
        return Choice(Strided(spec_out.index(letter), ps.chunks), {other: REPLICATE})
    return None


def contraction(ctx, node, axis, a, b, spec_a, spec_b, spec_out):
    if isinstance(ctx.placement(a, axis), Strided) or isinstance(ctx.placement(b, axis), Strided):
        choice = _strided_contraction(ctx, axis, a, b, spec_a, spec_b, spec_out)
        if choice is not None:
            return choice
        strided = [o for o in (a, b) if isinstance(ctx.placement(o, axis), Strided)]
        if all(ctx.placement(o, axis) not in (REPLICATE, PARTIAL) for o in (a, b)):
            # Both split, at least one chunked, and no chunked rule fits: rule 5 says which keeps its split.
            def letter(n):
                return (spec_a if n is a else spec_b)[split_dim(ctx.placement(n, axis))]
            keeper = anchor(ctx, axis, node, [a, b], letter, survives=lambda n: letter(n) in spec_out)
            mover = b if keeper is a else a
            ctx.effective[mover] = ctx.layout(mover).with_axis(axis, REPLICATE)
            if isinstance(ctx.placement(keeper, axis), Strided):
                choice = _strided_contraction(ctx, axis, a, b, spec_a, spec_b, spec_out)
                if choice is not None:
                    return Choice(choice.output, {mover: REPLICATE, **choice.inputs})
                strided = [keeper]
            else:
                strided = []
        for operand in strided:  # no chunked rule fits: that operand is used whole
            ctx.effective[operand] = ctx.layout(operand).with_axis(axis, REPLICATE)
    la, lb = _letter(spec_a, ctx.placement(a, axis)), _letter(spec_b, ctx.placement(b, axis))
    contracted = set(spec_a) & set(spec_b) - set(spec_out)

    def placement_in(spec, letter):
        return spec.index(letter) if letter in spec else REPLICATE

    if la == PARTIAL or lb == PARTIAL:
        if la == PARTIAL and lb == REPLICATE or lb == PARTIAL and la == REPLICATE:
            return Choice(PARTIAL)
        # Partial times a shard (or a Partial) is not a Partial of anything: reduce it first.
        keep, reduce = (b, a) if la == PARTIAL else (a, b)
        return contraction_after(ctx, node, axis, a, b, spec_a, spec_b, spec_out, {reduce: REPLICATE})
    if la == REPLICATE and lb == REPLICATE:
        return Choice(REPLICATE)
    if la == lb or REPLICATE in (la, lb):
        letter = la if la != REPLICATE else lb
        if letter in contracted:
            return Choice(PARTIAL, {a: placement_in(spec_a, letter), b: placement_in(spec_b, letter)})
        if letter in spec_a and letter in spec_b:  # a batch letter: both operands split the same way
            return Choice(spec_out.index(letter), {a: spec_a.index(letter), b: spec_b.index(letter)})
        return Choice(spec_out.index(letter), {a: placement_in(spec_a, letter) if letter in spec_a else REPLICATE,
                                               b: placement_in(spec_b, letter) if letter in spec_b else REPLICATE})
    # Both split, on different letters: the anchor keeps its split, the other operand follows it.
    keeper = anchor(ctx, axis, node, [a, b], lambda n: la if n is a else lb,
                    survives=lambda n: (la if n is a else lb) in spec_out)
    letter = la if keeper is a else lb
    mover, mover_spec = (b, spec_b) if keeper is a else (a, spec_a)
    required = {mover: mover_spec.index(letter) if letter in mover_spec else REPLICATE}
    return contraction_after(ctx, node, axis, a, b, spec_a, spec_b, spec_out, required)


def contraction_after(ctx, node, axis, a, b, spec_a, spec_b, spec_out, required):
    """The choice once `required` placements are applied (they are communication the rule asks for)."""
    placements = {a: ctx.placement(a, axis), b: ctx.placement(b, axis)}
    placements.update(required)
    la, lb = _letter(spec_a, placements[a]), _letter(spec_b, placements[b])
    letter = la if la != REPLICATE else lb
    if letter == REPLICATE:
        return Choice(REPLICATE, required)
    contracted = set(spec_a) & set(spec_b) - set(spec_out)
    if letter in contracted:
        required[a], required[b] = spec_a.index(letter), spec_b.index(letter)
        return Choice(PARTIAL, required)
    return Choice(spec_out.index(letter), required)


def equation(ctx, node) -> tuple[str, str, str]:
    """Letters of (a, b, out): one per batch dim (upper case), then m, k / k, n / m, n."""
    if node.target in EQUATIONS:
        return EQUATIONS[node.target]
    if node.target is LEADING_MATMUL:  # [..., k] @ [k, n]
        leading = "ABCDEFGHIJ"[:ctx.ndim(node) - 1]
        return leading + "k", "kn", leading + "n"
    if node.target is LEADING_CONTRACT:  # [..., k] x [..., n] -> [k, n]
        leading = "ABCDEFGHIJ"[:ctx.ndim(node.args[0]) - 1]
        return leading + "k", leading + "n", "kn"
    batch = "ABCDEFGHIJ"[:ctx.ndim(node) - 2]
    return batch + "mk", batch + "kn", batch + "mn"


@handles_strided
@rule(*EQUATIONS, BATCHED_MATMUL, LEADING_MATMUL, LEADING_CONTRACT)
def matmul(ctx, node, axis):
    spec_a, spec_b, spec_out = equation(ctx, node)
    a, b = node.args[0], node.args[1]
    if a is b:
        raise ctx.error(node, "a product of a tensor with itself is not supported")
    return contraction(ctx, node, axis, a, b, spec_a, spec_b, spec_out)
