"""How many torch threads a step runs on, on CPU.

One torch thread for a small step, every core for a large one. A one-row
decode step is a chain of small ops, and a second thread waits at each op's
barrier whenever the HTTP side or a client takes a core. On the 2-core CPU
(make bench-engines, 256 in, 64 out): one thread for steps of up to 8 tokens
took concurrency 1 from 14.4 to 21.6 tok/s and concurrency 8 from 57.9 to
88.1, while 32-row steps ran 16 % slower on one thread than on two (100.5
against 119.8 tok/s).
"""

from __future__ import annotations

import torch

SMALL_STEP_TOKENS = 8  # steps of at most this many tokens run on one CPU thread


class StepThreads:
    def __init__(self, device: torch.device):
        self.device = device
        self.all = torch.get_num_threads()

    def set_for(self, step_tokens: int) -> None:
        if self.device.type != "cpu":
            return
        wanted = 1 if step_tokens <= SMALL_STEP_TOKENS else self.all
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
