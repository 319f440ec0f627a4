"""``rlhfkit loop``: iterative RLHF in rounds (:mod:`rlhfkit.loop.command`), its plan
(:mod:`rlhfkit.loop.plan`) and its phases (:mod:`rlhfkit.loop.phases`)."""
