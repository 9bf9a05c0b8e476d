"""The parts of ``stratacache tune`` (the command itself is :mod:`stratacache.tune`):
:mod:`.data` (the pairs it learns from and holds back), :mod:`.training` (the trainers,
checkpoints and stopping) and :mod:`.card` (the held-back evaluation and the model card)."""
