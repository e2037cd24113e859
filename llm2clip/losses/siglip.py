"""SigLIP's pairwise sigmoid loss, with the texts of the other ranks passed around a ring.

Zhai, Mustafa, Kolesnikov and Beyer, "Sigmoid Loss for Language Image Pre-Training" (ICCV 2023,
arXiv:2303.15343) replace CLIP's softmax over the batch by an independent binary classification
of every image-text pair: matching pairs are positives, every other pair a negative. No
normalisation over the batch is needed, so no rank needs the whole batch at once: each rank
scores its images against its own texts, then against the texts of the other ranks, which
travel from neighbour to neighbour (the paper's "chunked" implementation; open_clip's
``SigLipLoss`` with its default ``dist_impl="bidir"`` in ``src/open_clip/loss.py`` is the
reference this module is tested against, value and gradients).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm2clip.losses.base import ContrastiveLoss, LossOutput, as_scalar, check_pair
from llm2clip.train.distributed import gather_sizes, get_rank, get_world_size


def _send_recv(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
    """Post every send and receive of one exchange at once, then wait for all of them."""
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer) for tensor, peer in sends]
    ops += [dist.P2POp(dist.irecv, tensor, peer) for tensor, peer in recvs]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


class _PassRight(torch.autograd.Function):
    """Send a tensor to the right neighbour and receive the left one's, keeping the graph.

    Backward runs the exchange the other way: the gradient of what came from the left goes back
    to the left, and the gradient of what went right comes back from the right.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, left: int, right: int, rows_from_left: int) -> torch.Tensor:
        received = tensor.new_empty((rows_from_left, *tensor.shape[1:]))
        _send_recv([(tensor, right)], [(received, left)])
        ctx.left, ctx.right, ctx.sent_shape = left, right, tensor.shape
        return received

    @staticmethod
    def backward(ctx, grad_received: torch.Tensor):
        grad_sent = grad_received.new_empty(ctx.sent_shape)
        _send_recv([(grad_received, ctx.left)], [(grad_sent, ctx.right)])
        return grad_sent, None, None, None


class _PassBoth(torch.autograd.Function):
    """One step of the bidirectional ring: send one tensor left and one right, receive one from
    each side. Backward returns every gradient to the rank its tensor came from."""

    @staticmethod
    def forward(ctx, to_left: torch.Tensor, to_right: torch.Tensor, left: int, right: int,
                rows_from_left: int, rows_from_right: int) -> tuple[torch.Tensor, torch.Tensor]:
        from_left = to_right.new_empty((rows_from_left, *to_right.shape[1:]))
        from_right = to_left.new_empty((rows_from_right, *to_left.shape[1:]))
        _send_recv([(to_left, left), (to_right, right)], [(from_left, left), (from_right, right)])
        ctx.left, ctx.right = left, right
        ctx.shapes = to_left.shape, to_right.shape
        return from_left, from_right

    @staticmethod
    def backward(ctx, grad_from_left: torch.Tensor, grad_from_right: torch.Tensor):
        # the left neighbour got our ``to_left`` as its ``from_right``: its gradient comes from
        # the left; symmetrically for the right
        grad_to_left = grad_from_left.new_empty(ctx.shapes[0])
        grad_to_right = grad_from_right.new_empty(ctx.shapes[1])
        _send_recv([(grad_from_left, ctx.left), (grad_from_right, ctx.right)],
                   [(grad_to_left, ctx.left), (grad_to_right, ctx.right)])
        return grad_to_left, grad_to_right, None, None, None, None


def ring_blocks(text: torch.Tensor) -> list[torch.Tensor]:
    """The text features of every *other* rank, obtained from neighbours with gradient.

    Each round passes one block a step left and another a step right around the ring, so after
    round ``k`` a rank holds the texts of the ranks ``k`` places to its right and to its left;
    an even world needs one last one-way step for the rank straight opposite. That is
    ``ceil((W - 1) / 2)`` rounds of one ``(B, D)`` message each way instead of an all-gather.
    Local batch sizes may differ between ranks (one all-gather of the sizes first).

    Args:
        text: ``(B, D)`` this rank's text features.

    Returns:
        ``W - 1`` tensors ``(B_r, D)``, one per other rank ``r`` (in no particular order); empty
        without a process group.
    """
    world, rank = get_world_size(), get_rank()
    if world == 1:
        return []
    sizes = gather_sizes(text.shape[0], text.device)
    left, right = (rank - 1) % world, (rank + 1) % world
    rounds, one_way = divmod(world - 1, 2)
    blocks: list[torch.Tensor] = []
    to_left = to_right = text
    for step in range(1, rounds + 1):
        to_right, to_left = _PassBoth.apply(to_left, to_right, left, right,
                                            sizes[(rank - step) % world], sizes[(rank + step) % world])
        blocks += [to_right, to_left]  # from rank - step (travelling right), from rank + step
    if one_way:
        blocks.append(_PassRight.apply(to_right, left, right, sizes[(rank - rounds - 1) % world]))
    return blocks


class SigLipLoss(ContrastiveLoss):
    """Sigmoid image-text loss of SigLIP (Zhai et al. 2023), exchanged around a ring of ranks.

    With ``s = logit_scale`` (already exponentiated), scalar bias ``b``, this rank's images
    ``I`` (``(B, D)``, L2-normalised) and any block of texts ``T_r`` (``(B_r, D)``)::

        logits(T_r) = s * I @ T_r.T + b                 # (B, B_r)
        z_ij        = +1 for a matching pair (i == j, own texts only), else -1
        loss        = -sum over the own block and every other rank's block of log sigmoid(z_ij * logits_ij) / B

    i.e. every image of this rank is classified against every text of every rank, with
    positives on the diagonal of the own block only (the other ranks' blocks are all
    negatives). Like open_clip, the loss is a sum over pairs divided by the *local* batch size
    ``B``, not a mean over the ``B x WB`` pairs; with equal batches the mean over ranks equals
    the single-process loss on the global batch. Text features travel with gradient (see
    :func:`ring_blocks`); image features never leave their rank. Maths in fp32.

    The paper starts the temperature at 10 (``init_logit_scale = log(10)``) and the bias at -10
    (``init_logit_bias``), so that the many negatives do not dominate the first steps; the bias
    is learnable (``needs_bias``).
    """

    name = "siglip"
    needs_bias = True
    init_logit_scale = math.log(10.0)
    init_logit_bias = -10.0

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> LossOutput:
        """Sigmoid loss of this rank's images against the texts of every rank.

        Args:
            image_features: ``(B, D)`` L2-normalised image embeddings of this rank.
            text_features: ``(B, D)`` L2-normalised text embeddings; row ``i`` pairs with image ``i``.
            logit_scale: ``exp`` of the model's log inverse temperature, shape ``[]`` or ``[1]``.
            logit_bias: The model's learnable bias, shape ``[]`` or ``[1]``; None = no bias.

        Returns:
            :class:`~llm2clip.losses.base.LossOutput`: ``loss`` over all blocks, and the logits of
            the own ``(B, B)`` block (``logits_per_text`` is its transpose) with
            ``labels = arange(B)``.
        """
        check_pair(image_features, text_features)
        image, text = image_features.float(), text_features.float()
        scale = as_scalar(logit_scale, "logit_scale")
        bias = None if logit_bias is None else as_scalar(logit_bias, "logit_bias")

        def logits(texts: torch.Tensor) -> torch.Tensor:
            out = scale * image @ texts.T
            return out if bias is None else out + bias

        own = logits(text)  # (B, B)
        n = image.shape[0]
        signs = 2 * torch.eye(n, device=own.device, dtype=own.dtype) - 1  # +1 diagonal, -1 elsewhere
        total = -F.logsigmoid(signs * own).sum()
        if self.gather:
            for block in ring_blocks(text):
                total = total - F.logsigmoid(-logits(block)).sum()
        labels = torch.arange(n, device=own.device)
        return {"loss": total / n, "logits_per_image": own, "logits_per_text": own.T, "labels": labels}
