"""Host-side scheduling of the rollout engine: waiting queue, slots, pages, refill, preemption.

Pure Python and deterministic: given the same prompts and the same device outputs it makes the
same decisions, so on a multi-host mesh every process runs its own copy on the global inputs
and the SPMD programs stay in lockstep (the engine all-gathers each call's outputs).

Requests are the rows of the result, prompt-major (row r = prompt r // G, sample r % G), queued
in that order.  Each round:

1. `admit`: walks the queue and admits requests into free slots while their shard has pages
   for the request's first call *and* for the next call of every slot already running there
   (so a reservation rarely has to preempt).  A request whose prompt is resident (prefilled,
   some sample still waiting) goes to the prompt's shard and shares its full pages; otherwise
   its prompt is prefilled on the shard with the most free slots (then pages).
2. the engine prefills the new prompts; `insert` puts the admitted requests in slots with their
   first token (a request whose first token ends it never takes a slot).
3. `reserve` checks that every shard has a free page for each running slot about to start a
   page (the decode program itself hands out further pages from each shard's free list as
   slots cross page boundaries, and stops before a step a shard could not cover).  When a
   shard runs out, the most recently admitted request there is preempted: its pages are freed
   and it goes back to the front of the queue.  Generation is a function of (seed, row, token
   index) only, so the restarted request reproduces its tokens.  Nothing ever runs out of
   memory inside a device call, and no page is held before a token needs it.
4. `batch` lays the running requests out in slots (shard d's requests in shard d's block of
   rows, compacted) for a decode call of the smallest slot bucket that holds them once no
   request waits, so the tail of a long-tailed workload does not pay for idle slots; the
   page-table width is the smallest bucket covering the longest running row.
5. `decoded` appends the call's tokens, retires finished requests and frees their pages.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from rlcsd_jax.inference.pages import PageAllocator


@dataclasses.dataclass
class Request:
    row: int
    prompt: int
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    pages: list = dataclasses.field(default_factory=list)   # page table (shared prefix first)
    shard: int = -1
    kv_len: int = 0                 # tokens whose KV is stored
    admitted_at: int = -1           # admission counter (preemption picks the largest)
    copy_from: int | None = None    # partial prompt page to copy into pages[shared]


@dataclasses.dataclass
class Prompt:
    tokens: list
    shard: int = -1
    pages: list | None = None       # held while some sample waits (None: not resident)
    waiting: int = 0                # samples in the queue
    running: int = 0                # samples in slots
    first: tuple | None = None      # (tokens [G], logprobs [G]) drawn at prefill
    prefill_pages: list | None = None   # where its last prefill wrote it (the engine's target)


@dataclasses.dataclass
class Limits:
    """The scheduler's knobs (see `engine.EngineConfig`)."""

    max_slots: int
    min_slots: int
    shards: int
    pages_per_shard: int
    page_size: int
    steps_per_call: int
    max_new_tokens: int
    prefill_rows: int                # most prompts prefilled per shard per round
    refill_fraction: float
    table_widths: tuple              # allowed page-table widths, ascending


class Scheduler:
    def __init__(self, prompts, num_samples: int, eos_ids, limits: Limits):
        self.lim, self.g = limits, num_samples
        self.eos = set(int(e) for e in eos_ids)
        self.prompts = [Prompt(list(p), waiting=num_samples) for p in prompts]
        self.requests = [Request(r, r // num_samples) for r in range(len(prompts) * num_samples)]
        self.queue = collections.deque(range(len(self.requests)))
        self.pages = PageAllocator(limits.shards, limits.pages_per_shard)
        self.slots_per_shard = limits.max_slots // limits.shards
        self.running: list[list[int]] = [[] for _ in range(limits.shards)]
        self.finished: dict[int, bool] = {}            # row -> truncated
        self._admissions = 0
        self.pending: list[int] = []                    # admitted, not yet in slots
        self.stats = dict(decode_steps=0, busy_slot_steps=0, total_slot_steps=0,
                          peak_kv_tokens=0, live_kv_tokens_at_peak=0, decode_calls=0,
                          prefill_calls=0, prefill_rows=0, preemptions=0)

    # ------------------------------------------------------------------------------------------
    def done(self) -> bool:
        return len(self.finished) == len(self.requests)

    def _pages_needed(self, req: Request, kv_len: int) -> int:
        """Pages covering every position the next call can write (capped at the last
        position a request ever writes: prompt + max_new_tokens - 2)."""
        top = min(kv_len + self.lim.steps_per_call,
                  len(self.prompts[req.prompt].tokens) + self.lim.max_new_tokens - 1)
        return -(-top // self.lim.page_size)

    def _growth(self, shard: int) -> int:
        """Pages the running requests of `shard` need for their next call."""
        return sum(max(0, self._pages_needed(self.requests[r], self.requests[r].kv_len)
                       - len(self.requests[r].pages)) for r in self.running[shard])

    def _cost(self, req: Request, prompt: Prompt) -> int:
        """Fresh pages admitting `req` takes: the prompt's pages unless resident, and the
        request's own pages for its first call (past the shared full prompt pages; the partial
        prompt page is copied, or taken over by the prompt's last waiting sample)."""
        ps, n = self.lim.page_size, len(prompt.tokens)
        own = self._pages_needed(req, n) - n // ps
        takes_partial = n % ps and prompt.waiting == 1
        return (0 if prompt.pages is not None else -(-n // ps)) + own - bool(takes_partial)

    # ------------------------------------------------------------------------------------------
    def admit(self) -> dict[int, list[int]]:
        """Admit what fits; returns the prompts to prefill, per shard (pages allocated)."""
        lim, ps = self.lim, self.lim.page_size
        free_slots = [self.slots_per_shard - len(r) for r in self.running]
        growth = [self._growth(d) for d in range(lim.shards)]
        prefill: dict[int, list[int]] = collections.defaultdict(list)
        self.pending = []
        kept = collections.deque()
        while self.queue:
            row = self.queue.popleft()
            req, prompt = self.requests[row], self.prompts[self.requests[row].prompt]
            shard = self._place(req, prompt, free_slots, growth, prefill)
            if shard is None:
                kept.append(row)
                continue
            if prompt.pages is None:                       # prefill it on `shard`
                prompt.shard = shard
                prompt.pages = self.pages.alloc(shard, -(-len(prompt.tokens) // ps))
                prompt.prefill_pages, prompt.first = list(prompt.pages), None
                prefill[shard].append(req.prompt)
            self._attach(req, prompt, shard)
            free_slots[shard] -= 1
            self.pending.append(row)
        self.queue = kept
        return dict(prefill)

    def _place(self, req, prompt, free_slots, growth, prefill) -> int | None:
        """The shard the request can start on now, or None: a free slot, and pages for its
        admission with the next call of every running slot there still covered."""
        if prompt.pages is not None:
            shards = [prompt.shard]
        else:
            shards = sorted((d for d in range(self.lim.shards)
                             if len(prefill.get(d, ())) < self.lim.prefill_rows),
                            key=lambda d: (-free_slots[d], -self.pages.free(d), d))
        cost = self._cost(req, prompt)
        for d in shards:
            if free_slots[d] > 0 and self.pages.free(d) - cost >= growth[d]:
                return d
        return None

    def _attach(self, req: Request, prompt: Prompt, shard: int) -> None:
        """Give an admitted request its prompt pages: shared full pages, and the partial last
        page copied (or taken over by the prompt's last waiting sample)."""
        ps = self.lim.page_size
        full = len(prompt.tokens) // ps
        shared = prompt.pages[:full]
        self.pages.ref(shard, shared)
        req.pages, req.shard, req.copy_from = list(shared), shard, None
        if len(prompt.tokens) % ps:
            if prompt.waiting == 1:                        # the last one takes the page over
                req.pages.append(prompt.pages[full])
                prompt.pages = prompt.pages[:full]
            else:
                req.pages += self.pages.alloc(shard, 1)
                req.copy_from = prompt.pages[full]
        prompt.waiting -= 1
        prompt.running += 1
        if prompt.waiting == 0:                            # no sample left to share with
            self.pages.release(shard, prompt.pages)
            prompt.pages = None
        req.kv_len = len(prompt.tokens)
        req.admitted_at = self._admissions
        self._admissions += 1

    def prefilled(self, prompt_index: int, tokens, logprobs) -> None:
        self.prompts[prompt_index].first = (list(map(int, tokens)), list(map(float, logprobs)))

    def insert(self) -> list[tuple[int, int, int]]:
        """Put the requests admitted by `admit` in slots.  Returns the page copies
        [(shard, src, dst)] that must run before the next decode call."""
        copies = []
        for row in self.pending:
            req = self.requests[row]
            prompt = self.prompts[req.prompt]
            tok, lp = prompt.first[0][row % self.g], prompt.first[1][row % self.g]
            req.tokens, req.logprobs = [tok], [lp]
            if tok in self.eos or self.lim.max_new_tokens == 1:
                self._finish(req)
                continue
            if req.copy_from is not None:
                copies.append((req.shard, req.copy_from, req.pages[len(prompt.tokens)
                                                                    // self.lim.page_size]))
            self.running[req.shard].append(row)
        self.pending = []
        return copies

    def _finish(self, req: Request) -> None:
        self.pages.release(req.shard, req.pages)
        req.pages = []
        self.prompts[req.prompt].running -= 1
        self.finished[req.row] = req.tokens[-1] not in self.eos

    # ------------------------------------------------------------------------------------------
    def reserve(self) -> None:
        """Make sure the next call can take its first step: every shard has a free page for
        each running slot whose next token starts a new page; otherwise preempt the most
        recently admitted requests there.  Later pages are taken inside the call."""
        for d in range(self.lim.shards):
            while self.running[d]:
                demand = sum(self.requests[r].kv_len // self.lim.page_size
                             >= len(self.requests[r].pages) for r in self.running[d])
                if demand <= self.pages.free(d):
                    break
                victim = max(self.running[d], key=lambda r: self.requests[r].admitted_at)
                self._preempt(self.requests[victim])

    def _preempt(self, req: Request) -> None:
        self.running[req.shard].remove(req.row)
        self.pages.release(req.shard, req.pages)
        prompt = self.prompts[req.prompt]
        prompt.running -= 1
        prompt.waiting += 1
        req.pages, req.tokens, req.logprobs, req.kv_len = [], [], [], 0
        self.queue.appendleft(req.row)
        self.stats["preemptions"] += 1

    # ------------------------------------------------------------------------------------------
    def batch(self) -> dict | None:
        """Host arrays of the next decode call (`programs.SlotBatch`), or None when no slot
        is running."""
        lim = self.lim
        most = max(len(r) for r in self.running)
        if most == 0:
            return None
        slots = lim.max_slots
        if not self.queue:                                 # shrink to the smallest bucket
            while (slots // 2 >= lim.min_slots and slots // 2 % lim.shards == 0
                   and slots // 2 // lim.shards >= most):
                slots //= 2
        per = slots // lim.shards
        reach = max(self._pages_needed(self.requests[r], self.requests[r].kv_len)
                    for rows in self.running for r in rows)
        width = next(w for w in lim.table_widths if w >= reach)
        f = lim.pages_per_shard
        a = dict(tokens=np.zeros(slots, np.int32), kv_len=np.zeros(slots, np.int32),
                 generated=np.zeros(slots, np.int32), request=np.zeros(slots, np.int32),
                 active=np.zeros(slots, bool), table=np.zeros((slots, width), np.int32),
                 num_pages=np.zeros(slots, np.int32),
                 free_pages=np.zeros(lim.shards * f, np.int32),
                 free_count=np.zeros(lim.shards, np.int32))
        layout = []
        for d, rows in enumerate(self.running):
            free = self.pages.free_list(d)
            a["free_pages"][d * f:d * f + len(free)] = free
            a["free_count"][d] = len(free)
            for i, row in enumerate(sorted(rows, key=lambda r: self.requests[r].admitted_at)):
                req, s = self.requests[row], d * per + i
                a["tokens"][s], a["kv_len"][s] = req.tokens[-1], req.kv_len
                a["generated"][s], a["request"][s] = len(req.tokens), row
                a["active"][s] = True
                a["table"][s, :len(req.pages)] = req.pages
                a["num_pages"][s] = len(req.pages)
                layout.append((s, row))
        waiting = bool(self.queue)
        exit_after = max(1, math.ceil(lim.refill_fraction * slots)) if waiting else slots + 1
        return dict(arrays=a, layout=layout, slots=slots, exit_after=exit_after)

    def decoded(self, batch: dict, out) -> None:
        """Apply one decode call's outputs (`programs.DecodeOut` as host arrays)."""
        steps = int(out.steps)
        self.stats["decode_calls"] += 1
        self.stats["decode_steps"] += steps
        self.stats["busy_slot_steps"] += int(np.sum(out.count))
        self.stats["total_slot_steps"] += steps * batch["slots"]
        new_pages = [[] for _ in range(self.lim.shards)]
        for s, row in batch["layout"]:
            req, c = self.requests[row], int(out.count[s])
            req.tokens += out.tokens[s, :c].tolist()
            req.logprobs += out.logprobs[s, :c].tolist()
            req.kv_len += c
            new = out.table[s, len(req.pages):int(out.num_pages[s])].tolist()
            new_pages[req.shard] += new
            req.pages += new
        for d in range(self.lim.shards):     # the device took the first pages of the free list
            taken = self.pages.alloc(d, int(out.taken[d]))
            assert sorted(taken) == sorted(new_pages[d]), (d, taken, new_pages[d])
        held = self.pages.in_use() * self.lim.page_size
        if held > self.stats["peak_kv_tokens"]:
            self.stats["peak_kv_tokens"] = held
            self.stats["live_kv_tokens_at_peak"] = self._live_tokens()
        for s, row in batch["layout"]:
            if out.done[s]:
                req = self.requests[row]
                self.running[req.shard].remove(row)
                self._finish(req)

    def _live_tokens(self) -> int:
        """KV positions written and still held (shared prompt pages counted once)."""
        ps, live = self.lim.page_size, 0
        for prompt in self.prompts:
            n = len(prompt.tokens)
            if prompt.pages is not None:
                live += n
            elif prompt.running:
                live += n // ps * ps                      # its shared full pages
        for rows in self.running:
            for row in rows:
                req = self.requests[row]
                live += req.kv_len - len(self.prompts[req.prompt].tokens) // ps * ps
        return live

    # ------------------------------------------------------------------------------------------
    def results(self, pad_id: int) -> dict:
        """tokens [R, N] int32 (pad after the end), logprobs [R, N] fp32, lengths [R],
        truncated [R] bool; rows prompt-major."""
        n, rows = self.lim.max_new_tokens, len(self.requests)
        tokens = np.full((rows, n), pad_id, np.int32)
        logprobs = np.zeros((rows, n), np.float32)
        lengths = np.zeros(rows, np.int32)
        truncated = np.zeros(rows, bool)
        for req in self.requests:
            k = len(req.tokens)
            tokens[req.row, :k], logprobs[req.row, :k] = req.tokens, req.logprobs
            lengths[req.row], truncated[req.row] = k, self.finished[req.row]
        return dict(tokens=tokens, logprobs=logprobs, lengths=lengths, truncated=truncated)
