"""SAM's mask decoder for many point prompts on one image: the same numbers for less work.

`SamAutomaticMaskGenerator` decodes 64 points at a time with one `MaskDecoder` call on a batch that
repeats the image embedding 64 times. On a CPU two things in that call are waste:

1. the first two-way attention block's image-side terms (image embedding plus the no-mask dense
   embedding, its positional encoding, and their key, value and query projections over all 64x64
   tokens) are the same for every point prompt, yet they are added, copied and projected once per
   prompt;
2. every image-side intermediate is B x 4096 x 256 floats (64 MB at B=64), far beyond the caches,
   so the many memory-bound steps (adds, layer norms, layout copies) run at memory speed.

`SharedImageDecoder` computes (1) once per image and runs the rest in micro-batches of a few
prompts. It repeats SAM's operations on the same values with the same layouts and in the same
order: SAM's first-block projections see a non-contiguous input, so PyTorch runs them as matmul
then bias add (not a fused addmm), and so do we. The outputs equal `MaskDecoder.forward`'s to float
rounding, and bit for bit wherever the float kernels give each output row the same bits whatever
the number of rows (on our Intel Xeon build machine: micro-batches of 4 or more; not on every CPU).
`tests/hierarchical/test_decoder.py` checks micro-batch sizes against SAM's batch to `LOGIT_EPS` of the
output's magnitude, the epsilon of the generator's contract (`hierarchical/agreement.py`).
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention

# One prompt alone sends the decoder's per-prompt products down other CPU kernel paths (matrix-vector)
# whose results differ in the last bits; a SAM batch smaller than the micro-batch goes to SAM's own code.
MIN_MICRO_BATCH = 2
# On a CPU, 4 prompts keep each micro-batch's B x 4096 x 256 intermediates (16 MB) near the caches.
CPU_MICRO_BATCH = 4


def default_micro_batch(device: torch.device, points_per_batch: int) -> int:
    """The micro-batch when none is set: `CPU_MICRO_BATCH` on a CPU; on a GPU the whole prompt batch in
    one call, since a GPU is bound by kernel launches, not caches, and only the shared image-side work pays."""
    if device.type == "cpu":
        return CPU_MICRO_BATCH
    return max(MIN_MICRO_BATCH, points_per_batch)


def _project_like_sam(linear: torch.nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """`linear(x)` as PyTorch computes it for SAM's non-contiguous B x HW x C input: copy, matmul, add bias."""
    return torch.matmul(tokens.contiguous(), linear.weight.t()) + linear.bias


def _attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`Attention.forward` after its three input projections; a batch-1 q, k or v broadcasts over prompts."""
    heads = attention.num_heads
    q, k, v = (attention._separate_heads(x, heads) for x in (q, k, v))
    attn = q @ k.permute(0, 1, 3, 2)
    attn = attn / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    return attention.out_proj(attention._recombine_heads(attn @ v))


class SharedImageDecoder:
    """`MaskDecoder.forward(image, pe, sparse, dense, multimask_output)` for one image and many prompts.

    `dense_embedding` is the 1xCxHxW dense prompt embedding every prompt shares (the prompt encoder's
    no-mask embedding for point prompts). Calls take Bx(N)xC sparse prompt embeddings and return
    SAM's (masks, iou_predictions) for them, computed `micro_batch` to `2 * micro_batch - 1` prompts at
    a time; a call with fewer than `micro_batch` prompts is passed to SAM's decoder unchanged.
    """

    def __init__(
        self,
        decoder: MaskDecoder,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_embedding: torch.Tensor,
        micro_batch: int = 4,
    ) -> None:
        if image_embeddings.shape[0] != 1 or dense_embedding.shape[0] != 1:
            raise ValueError("SharedImageDecoder takes one image: 1xCxHxW embeddings and dense prompt embedding")
        if micro_batch < MIN_MICRO_BATCH:
            raise ValueError(
                f"micro_batch must be >= {MIN_MICRO_BATCH}, got {micro_batch}: a single prompt takes other CPU "
                "kernels and the outputs stop matching SAM's"
            )
        self.decoder = decoder
        self.micro_batch = micro_batch
        self._image_embeddings, self._image_pe, self._dense = image_embeddings, image_pe, dense_embedding
        self.image_size = image_embeddings.shape[1:]
        first = decoder.transformer.layers[0]
        # SAM's src + dense and its flatten(2).permute(0, 2, 1) view, once instead of once per prompt.
        self.keys = (image_embeddings + dense_embedding).flatten(2).permute(0, 2, 1)
        self.key_pe = image_pe.flatten(2).permute(0, 2, 1)
        keys_with_pe = self.keys + self.key_pe
        self.token_to_image_k = _project_like_sam(first.cross_attn_token_to_image.k_proj, keys_with_pe)
        self.token_to_image_v = _project_like_sam(first.cross_attn_token_to_image.v_proj, self.keys)
        self.image_to_token_q = _project_like_sam(first.cross_attn_image_to_token.q_proj, keys_with_pe)

    def __call__(self, sparse: torch.Tensor, multimask_output: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if len(sparse) < self.micro_batch:
            dense = self._dense.expand(len(sparse), -1, -1, -1)
            return self.decoder(self._image_embeddings, self._image_pe, sparse, dense, multimask_output)
        decoder = self.decoder
        starts = list(range(0, len(sparse), self.micro_batch))
        if len(sparse) - starts[-1] < self.micro_batch:
            starts.pop()  # a short tail joins the micro-batch before it
        chunks = [slice(start, end) for start, end in zip(starts, [*starts[1:], len(sparse)], strict=True)]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)

        hs, keys = zip(*(self._transformer(tokens[chunk]) for chunk in chunks), strict=True)
        hs = torch.cat(hs)
        # The B x 256 products run on the whole batch, as in SAM: so few rows are not batch-invariant.
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        iou_pred = decoder.iou_prediction_head(hs[:, 0, :])
        masks = [self._masks(hyper_in[chunk], chunk_keys) for chunk, chunk_keys in zip(chunks, keys, strict=True)]
        masks = torch.cat(masks)
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def _transformer(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`TwoWayTransformer.forward` with the first block's image-side terms taken from `__init__`."""
        transformer = self.decoder.transformer
        queries, keys = self._first_block(tokens)
        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=self.key_pe)
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + self.key_pe, v=keys)
        return transformer.norm_final_attn(queries + attn_out), keys

    def _masks(self, hyper_in: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The tail of `MaskDecoder.predict_masks`: upscale the image tokens, product with the hypernetwork outputs."""
        c, h, w = self.image_size
        upscaled = self.decoder.output_upscaling(keys.transpose(1, 2).view(len(keys), c, h, w))
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)

    def _first_block(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`TwoWayAttentionBlock.forward` of layer 0 (which skips the query PE in self-attention)."""
        block = self.decoder.transformer.layers[0]
        queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
        token_to_image = block.cross_attn_token_to_image
        q = token_to_image.q_proj(queries + tokens)
        queries = block.norm2(queries + _attend(token_to_image, q, self.token_to_image_k, self.token_to_image_v))
        queries = block.norm3(queries + block.mlp(queries))
        image_to_token = block.cross_attn_image_to_token
        k = image_to_token.k_proj(queries + tokens)
        v = image_to_token.v_proj(queries)
        keys = block.norm4(self.keys + _attend(image_to_token, self.image_to_token_q, k, v))
        return queries, keys
