"""Tensor parallelism: the ranks of one worker (``ranks``), their process group and collectives
(``group``), which device each rank runs on (``devices``)."""
