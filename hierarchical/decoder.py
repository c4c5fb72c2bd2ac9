"""SAM's mask decoder for many point prompts on one image: the same function for less work.

`SamAutomaticMaskGenerator` decodes 64 points at a time with one `MaskDecoder` call on a batch that
repeats the image embedding 64 times. Three things in that call are waste on a CPU:

1. the first two-way attention block's image-side terms (image embedding plus the no-mask dense
   embedding, its positional encoding, and their key, value and query projections over all 64x64
   tokens) are the same for every prompt, yet they are computed once per prompt;
2. every other attention between the 7 prompt tokens and the 4096 image tokens projects all 4096
   image tokens (256 -> 128 channels, 134M multiply-adds) only to take dot products with 7 tokens
   or weighted sums of 7 values. The projection folds into the 7 tokens instead: a query-key
   product `(x W_q^T + b_q) . k` is `x . (W_q^T k) + b_q . k`, a value sum `sum_j a_j (W_o v_j)`, so
   each attention costs a 4096 x 256 x 56 product (8 heads x 7 tokens) instead of 4096 x 256 x 128,
   and the head split/merge copies and the small-last-dimension softmax layouts disappear;
3. every image-side intermediate is B x 4096 x 256 floats (64 MB at B=64), far beyond the caches,
   so the memory-bound steps run at memory speed: we run micro-batches of a few prompts.

The mask head (two transposed convolutions with a layer norm and activations, then the product with
the hypernetwork outputs) is computed as two matrix products in a layout that needs no copies
(`_MaskHead`), and only for the prompts and masks asked for: `decode(..., pred_iou_thresh)` returns
the masks whose predicted IoU passes SAM's filter, so a prompt with none skips the mask head.

This is not SAM's sequence of float operations, so the outputs equal `MaskDecoder.forward`'s to float
rounding, not bit for bit: `tests/hierarchical/test_decoder.py` checks them against SAM's decoder to
`LOGIT_EPS` of the output's magnitude, and `tests/hierarchical/test_agreement.py` against a float64
decoder to half the contract's epsilons (`hierarchical/agreement.py`). Dropped: softmax-invariant
terms (a key bias adds the same number to every score of a token's softmax over the image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock

# Any number of prompts per call works; kept as a setting's lower bound (GeneratorConfig).
MIN_MICRO_BATCH = 1
# On a CPU: 4 prompts keep a micro-batch's B x 4096 x 256 intermediates (16 MB) near the caches and were
# fastest on a quiet 2-core Xeon (64 prompts at the paper's IoU filter, two runs: 4: 0.61-0.71 s, 8: 0.88 s,
# 16: 0.85-1.06 s, 64: 1.02-1.16 s). With other jobs on the cores (load 3-5) every one of its many small
# parallel regions waits for a descheduled thread (4: 11.4 s, 16: 4.1 s, 64: 2.5 s): on a shared machine
# pass a larger `decoder_micro_batch`.
CPU_MICRO_BATCH = 4


def default_micro_batch(device: torch.device, points_per_batch: int) -> int:
    """The micro-batch when none is set: `CPU_MICRO_BATCH` on a CPU; on a GPU the whole prompt batch in
    one call, since a GPU is bound by kernel launches, not caches."""
    if device.type == "cpu":
        return CPU_MICRO_BATCH
    return max(MIN_MICRO_BATCH, points_per_batch)


def _heads(attention: Attention) -> tuple[int, int]:
    heads = attention.num_heads
    return heads, attention.internal_dim // heads


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """B x T x (H*d) -> B x T x H x d (a view)."""
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads)


def _scale(attention: Attention) -> float:
    return _heads(attention)[1] ** -0.5


def _image_scores(attention: Attention, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For image queries x (N x C) against B x T token keys k (already projected): the (H*T) x C
    matrices M and H*T biases b with `M @ x^T + b` = SAM's scaled scores `q_proj(x)_h . k_jh / sqrt(d)`,
    row h*T + j (B x HT x C, B x HT x 1)."""
    heads, dim = _heads(attention)
    k = _split(k, heads) * _scale(attention)  # B x T x H x d
    weight = attention.q_proj.weight.view(heads, dim, -1)  # H x d x C
    matrix = torch.einsum("hdc,bthd->bhtc", weight, k).flatten(1, 2)
    bias = torch.einsum("hd,bthd->bht", attention.q_proj.bias.view(heads, dim), k).flatten(1)
    return matrix, bias.unsqueeze(2)


def _image_values(attention: Attention, v: torch.Tensor) -> torch.Tensor:
    """B x T token values v (already projected) -> B x HT x C rows `out_proj` of each head's value, so that
    softmax weights A (N x HT, each head's T weights summing to 1) give SAM's output as `A @ rows`.
    `out_proj`'s bias rides on head 0's rows (its weights sum to 1)."""
    heads, dim = _heads(attention)
    weight = attention.out_proj.weight.view(-1, heads, dim)  # C x H x d
    rows = torch.einsum("bthd,chd->bhtc", _split(v, heads), weight)
    rows[:, 0] += attention.out_proj.bias
    return rows.flatten(1, 2)


def _image_softmax(scores: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax over each head's T rows of B x HT x N scores, in place (the image tokens' softmax over the
    T prompt tokens, computed across rows: torch's softmax over a last dimension of 7 is slow)."""
    scores = scores.unflatten(1, (heads, -1))
    scores -= scores.amax(dim=2, keepdim=True)
    weights = scores.exp_()
    return weights.div_(weights.sum(dim=2, keepdim=True)).flatten(1, 2)


def _tokens_to_image(
    attention: Attention, q: torch.Tensor, keys_with_pe: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """`attention(q=q, k=keys_with_pe, v=keys)` for B x T token inputs q and B x N x C image tokens, without
    projecting the image tokens: scores `(W_k^T q_h) . x` (k_proj's bias is softmax-invariant), values
    `W_v (sum_n a_n x_n) + b_v`."""
    heads, dim = _heads(attention)
    q = _split(attention.q_proj(q), heads) * _scale(attention)  # B x T x H x d
    folded = torch.einsum("bthd,hdc->bhtc", q, attention.k_proj.weight.view(heads, dim, -1)).flatten(1, 2)
    weights = torch.softmax(torch.bmm(folded, keys_with_pe.transpose(1, 2)), dim=-1)  # B x HT x N
    summed = torch.bmm(weights, keys).unflatten(1, (heads, -1))  # B x H x T x C
    out = torch.einsum("bhtc,hdc->bthd", summed, attention.v_proj.weight.view(heads, dim, -1)).flatten(2)
    return attention.out_proj(out + attention.v_proj.bias)


@dataclass
class _SharedFirstBlock:
    """The prompt-independent image-side terms of the first block, per image."""

    keys: torch.Tensor  # N x C: image embedding + dense prompt embedding, as tokens
    key_pe: torch.Tensor  # N x C
    token_k: torch.Tensor  # H x N x d: cross_attn_token_to_image's keys, per head
    token_v: torch.Tensor  # H x N x d: its values
    image_q: torch.Tensor  # (H*d) x N: cross_attn_image_to_token's queries, scaled by 1/sqrt(d)


class _MaskHead:
    """`output_upscaling` then the hypernetwork product, as two matrix products on N x C tokens.

    A 2x2 stride-2 transposed convolution maps each input pixel to its own 2x2 output block, i.e. a C_in x
    (2*2*C_out) product per pixel; keeping (pixel, block position) as rows and channels last lets the
    LayerNorm2d run as `F.layer_norm` over the last dimension and the second convolution run on the
    same rows. The 256x256 mask order is restored only on the M masks of the product.
    """

    def __init__(self, decoder: MaskDecoder) -> None:
        first, norm, self.act1, second, self.act2 = decoder.output_upscaling
        self.norm = norm
        self.w1, self.b1 = self._as_matrix(first)
        self.w2, self.b2 = self._as_matrix(second)

    @staticmethod
    def _as_matrix(conv: torch.nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
        """C_in x (2*2*C_out) weight (columns: block row, block column, channel) and its bias."""
        if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0):
            raise ValueError("the mask head expects SAM's 2x2 stride-2 transposed convolutions")
        weight = conv.weight.permute(0, 2, 3, 1).flatten(1)  # C_in x (a, b, C_out)
        return weight, conv.bias.repeat(4)

    def __call__(self, keys: torch.Tensor, hyper_in: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """B x (h*w) x C tokens, B x M x C' hypernetwork outputs -> B x M x 4h x 4w mask logits."""
        h, w = size
        batch, masks = len(keys), hyper_in.shape[1]
        channels1 = self.norm.weight.numel()
        x = torch.addmm(self.b1, keys.flatten(0, 1), self.w1).view(-1, channels1)  # (b, y, x, a, c) x C1
        x = self.act1(F.layer_norm(x, (channels1,), self.norm.weight, self.norm.bias, self.norm.eps))
        channels2 = self.w2.shape[1] // 4
        x = self.act2(torch.addmm(self.b2, x, self.w2))  # (b, y, x, a, c) x (a2, c2, C2)
        x = torch.bmm(x.view(batch, -1, channels2), hyper_in.transpose(1, 2))  # b x (y, x, a, c, a2, c2) x M
        x = x.view(batch, h, w, 2, 2, 2, 2, masks).permute(0, 7, 1, 3, 5, 2, 4, 6)  # b, M, y, a, a2, x, c, c2
        return x.reshape(batch, masks, 4 * h, 4 * w)


class SharedImageDecoder:
    """`MaskDecoder.forward(image, pe, sparse, dense, multimask_output)` for one image and many prompts.

    `dense_embedding` is the 1xCxHxW dense prompt embedding every prompt shares (the prompt encoder's
    no-mask embedding for point prompts). `decoder(sparse, multimask_output)` takes Bx(N)xC sparse
    prompt embeddings and returns SAM's (masks, iou_predictions); `decode(sparse, pred_iou_thresh)`
    returns only the multimask outputs that pass SAM's predicted-IoU filter. Both run `micro_batch`
    prompts at a time.
    """

    def __init__(
        self,
        decoder: MaskDecoder,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_embedding: torch.Tensor,
        micro_batch: int = CPU_MICRO_BATCH,
    ) -> None:
        if image_embeddings.shape[0] != 1 or dense_embedding.shape[0] != 1:
            raise ValueError("SharedImageDecoder takes one image: 1xCxHxW embeddings and dense prompt embedding")
        if micro_batch < MIN_MICRO_BATCH:
            raise ValueError(f"micro_batch must be >= {MIN_MICRO_BATCH}, got {micro_batch}")
        self.decoder = decoder
        self.micro_batch = micro_batch
        self.grid = tuple(image_embeddings.shape[2:])
        self.mask_head = _MaskHead(decoder)
        first = decoder.transformer.layers[0]
        if not first.skip_first_layer_pe:
            raise ValueError("expected SAM's two-way transformer, whose first block skips the query PE")
        keys = (image_embeddings + dense_embedding).flatten(2)[0].t().contiguous()
        key_pe = image_pe.flatten(2)[0].t().contiguous()
        keys_with_pe = keys + key_pe
        to_image, to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        heads, dim = _heads(to_image)

        def per_head(x: torch.Tensor) -> torch.Tensor:
            return x.view(-1, heads, dim).transpose(0, 1).contiguous()

        self.shared = _SharedFirstBlock(
            keys=keys,
            key_pe=key_pe,
            token_k=per_head(to_image.k_proj(keys_with_pe)),
            token_v=per_head(to_image.v_proj(keys)),
            image_q=(to_token.q_proj(keys_with_pe) * _scale(to_token)).t().contiguous(),
        )

    def __call__(self, sparse: torch.Tensor, multimask_output: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        masks, iou_pred = [], []
        selection = slice(1, None) if multimask_output else slice(0, 1)
        for chunk in sparse.split(self.micro_batch):
            hs, keys = self._transformer(self._tokens(chunk))
            iou_pred.append(self.decoder.iou_prediction_head(hs[:, 0])[:, selection])
            masks.append(self.mask_head(keys, self._hyper_in(hs, selection), self.grid))
        return torch.cat(masks), torch.cat(iou_pred)

    def decode(
        self, sparse: torch.Tensor, pred_iou_thresh: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's multimask outputs, only those whose predicted IoU is > `pred_iou_thresh` (all where it is 0, as
        SAM's generator switches the filter off): (prompt index, mask index 0..2, K x 4h x 4w low-res logits,
        K predicted IoUs), in SAM's order (prompt, then mask)."""
        prompts, mask_ids, masks, ious = [], [], [], []
        for start in range(0, len(sparse), self.micro_batch):
            hs, keys = self._transformer(self._tokens(sparse[start : start + self.micro_batch]))
            iou_pred = self.decoder.iou_prediction_head(hs[:, 0])[:, 1:]
            keep = iou_pred > pred_iou_thresh if pred_iou_thresh > 0.0 else torch.ones_like(iou_pred, dtype=torch.bool)
            prompt, mask = keep.nonzero(as_tuple=True)
            prompts.append(prompt + start)
            mask_ids.append(mask)
            ious.append(iou_pred[prompt, mask])
            if not len(prompt):
                continue
            # Only the prompts with a surviving mask go through the mask head; their masks are all three
            # (the head's work is per prompt; the product per mask is small).
            needed = keep.any(dim=1)
            if not needed.all():
                rows = needed.nonzero()[:, 0]
                hs, keys = hs[rows], keys[rows]
            head = self.mask_head(keys, self._hyper_in(hs, slice(1, None)), self.grid)
            position = torch.cumsum(needed, 0) - 1  # a prompt's row among those kept
            masks.append(head[position[prompt], mask])
        if masks:
            low_res = torch.cat(masks)
        else:
            low_res = sparse.new_zeros(0, 4 * self.grid[0], 4 * self.grid[1])
        return torch.cat(prompts), torch.cat(mask_ids), low_res, torch.cat(ious)

    def _tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        return torch.cat((output_tokens.unsqueeze(0).expand(len(sparse), -1, -1), sparse), dim=1)

    def _hyper_in(self, hs: torch.Tensor, selection: slice) -> torch.Tensor:
        """B x M x C' hypernetwork outputs of the selected mask tokens."""
        decoder = self.decoder
        indices = range(decoder.num_mask_tokens)[selection]
        mlps = decoder.output_hypernetworks_mlps
        return torch.stack([mlps[i](hs[:, 1 + i]) for i in indices], dim=1)

    def _transformer(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`TwoWayTransformer.forward`: B x T tokens -> (B x T queries, B x N x C image tokens)."""
        transformer = self.decoder.transformer
        queries, keys = self._first_block(tokens)
        key_pe = self.shared.key_pe
        for layer in transformer.layers[1:]:
            queries, keys = self._block(layer, queries, keys, tokens)
        final = transformer.final_attn_token_to_image
        attn_out = _tokens_to_image(final, queries + tokens, keys + key_pe, keys)
        return transformer.norm_final_attn(queries + attn_out), keys

    def _first_block(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`TwoWayAttentionBlock.forward` of layer 0 (no query PE in self-attention) on the shared image terms."""
        block, shared = self.decoder.transformer.layers[0], self.shared
        queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
        to_image = block.cross_attn_token_to_image
        heads, dim = _heads(to_image)
        batch, count = tokens.shape[:2]
        q = to_image.q_proj(queries + tokens) * _scale(to_image)  # B x T x H*d
        q = q.view(batch * count, heads, dim).transpose(0, 1)  # H x BT x d
        weights = torch.softmax(torch.bmm(q, shared.token_k.transpose(1, 2)), dim=-1)  # H x BT x N
        out = torch.bmm(weights, shared.token_v).transpose(0, 1).reshape(batch, count, heads * dim)
        queries = block.norm2(queries + to_image.out_proj(out))
        queries = block.norm3(queries + block.mlp(queries))
        to_token = block.cross_attn_image_to_token
        heads, dim = _heads(to_token)
        k = _split(to_token.k_proj(queries + tokens), heads)  # B x T x H x d
        # Block-diagonal (B*H*T) x (H*d): one product of every prompt's keys with the shared queries.
        diagonal = torch.zeros(batch, heads, count, heads, dim, dtype=k.dtype, device=k.device)
        for head in range(heads):
            diagonal[:, head, :, head] = k[:, :, head]
        scores = torch.mm(diagonal.view(-1, heads * dim), shared.image_q).view(batch, heads * count, -1)
        rows = _image_values(to_token, to_token.v_proj(queries))
        keys = torch.baddbmm(shared.keys, _image_softmax(scores, heads).transpose(1, 2), rows)
        return queries, block.norm4(keys)

    def _block(
        self, block: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`TwoWayAttentionBlock.forward` of a later layer, image tokens never projected."""
        q = queries + tokens
        queries = block.norm1(queries + block.self_attn(q=q, k=q, v=queries))
        keys_with_pe = keys + self.shared.key_pe
        attn_out = _tokens_to_image(block.cross_attn_token_to_image, queries + tokens, keys_with_pe, keys)
        queries = block.norm2(queries + attn_out)
        queries = block.norm3(queries + block.mlp(queries))
        to_token = block.cross_attn_image_to_token
        matrix, bias = _image_scores(to_token, to_token.k_proj(queries + tokens))
        scores = torch.baddbmm(bias, matrix, keys_with_pe.transpose(1, 2))  # B x HT x N
        rows = _image_values(to_token, to_token.v_proj(queries))
        keys = keys.baddbmm_(_image_softmax(scores, _heads(to_token)[0]).transpose(1, 2), rows)
        return queries, block.norm4(keys)
