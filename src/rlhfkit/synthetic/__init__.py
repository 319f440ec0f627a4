"""Synthetic instruction data: ``self-instruct`` (new instructions bootstrapped from seed tasks by a
model, Wang et al. 2022) and ``templatize`` (FLAN-style instruction templates over a labelled dataset).
Both write ``sft.jsonl`` that ``rlhfkit sft`` trains on as it is."""
