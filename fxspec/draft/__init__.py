"""Draft heads and tree speculative decoding: the model-independent foundations.

* :mod:`fxspec.draft.heads`: Medusa, Hydra and EAGLE heads over the LM head's input, their checkpoint
  (``save_heads`` / ``load_heads``), EAGLE's draft KV cache and EAGLE-2 drafting;
* :mod:`fxspec.draft.train`: ``train_draft_heads`` (self-distillation on a frozen base, resumable) and
  ``draft_loss`` (the same loss, for joint training);
* :mod:`fxspec.draft.tree`: static (Medusa) and dynamic (EAGLE-2) candidate trees, and the verify buffers
  (tree attention mask, positions, retrieval paths);
* :mod:`fxspec.draft.accept`: greedy (exact), speculative sampling (lossless) and typical (lossy) acceptance.

A runtime's decode step with draft heads::

    tree   = TreeBuffers.from_paths(meta["tree"]).expand(B)           # or EagleHead.draft(...).buffers()
    cand   = heads.propose(h_last, root_token, tree, lm_head_weight)  # [B, n] candidate tokens
    logits = model(cand, positions=tree.position_ids(start), mask=tree.mask, ...)   # one verify pass
    acc    = greedy_accept(logits, cand, tree)                        # or speculative_accept(...)
    append acc.tokens[b, :acc.num_accepted[b] + 1]; keep the KV entries of acc.path
"""

from .accept import Acceptance, greedy_accept, processed_probs, speculative_accept, typical_accept
from .heads import (EagleCache, EagleHead, HeadsSpec, HydraHeads, MedusaHeads, build_heads, load_heads,
                    save_heads)
from .train import DraftLoss, TrainResult, draft_loss, evaluate_heads, train_draft_heads
from .tree import (DraftTree, Frontier, TreeBuffers, chain_tree, dynamic_tree, expected_accept_length,
                   static_tree, tree_paths)

__all__ = [
    "Acceptance", "DraftLoss", "DraftTree", "EagleCache", "EagleHead", "Frontier", "HeadsSpec", "HydraHeads",
    "MedusaHeads", "TrainResult", "TreeBuffers", "build_heads", "chain_tree", "draft_loss", "dynamic_tree",
    "evaluate_heads", "expected_accept_length", "greedy_accept", "load_heads", "processed_probs", "save_heads",
    "speculative_accept", "static_tree", "train_draft_heads", "tree_paths", "typical_accept",
]
