"""Cached launch plans: the tables of a fixed set of blocks, built once, kept across calls.

Filling a block's table row costs Python time (addresses, strides, checks: about 30 us a
block), which for a 72-target model is more than its kernels take on a GPU. A training loop
whose tensors stay put can build a plan once and then only run it: what changes every step
(gradient addresses, scalars) is sent with each run, and what a refresh changes (the factors,
often of a new width) is rewritten row by row by :meth:`BlockPlan.update_factors`.

A plan's blocks are split into groups, one per combination of the constexpr arguments of its
launches; a group is a dict with its rows in ``host`` (an int64 tensor) and, for a group of
Q3R blocks, the blocks' (rows, cols) in ``blocks``, their (rows, cols, k) in ``shapes`` and
their ``workspace``.
"""

from __future__ import annotations

import torch

from . import _meta as m
from .projection import put_factor_fields, put_workspace_fields


class BlockPlan:
    """The part of a plan that follows the factors: checking them, placing the workspace,
    writing the rows. Subclasses build ``groups`` and launch.

    The workspace (twice the factors' size) is only laid out here; each run allocates it and
    shifts the rows' workspace fields by its address (see run_table). Between runs its memory
    is free for other uses: the optimizer step and the regularizer's add_grad_ run after the
    backward pass has freed its activations, so the workspace does not add to the peak memory
    of a training step, which the forward and backward passes set.
    """

    def __init__(self, device):
        self.device = device
        self.groups: list[dict] = []
        self._where: list = []  # block -> (its group, its row there)
        self.settings = m.settings()  # the workspace layout and schedules follow them

    def check_settings(self) -> None:
        """Raise if q3r_kernels.CONFIG or the fp32 dot precision changed since the build: the
        plan's workspace layout and schedules were made for the old ones."""
        if m.settings() != self.settings:
            raise RuntimeError("q3r_kernels: CONFIG or the fp32 matmul precision changed since this plan was "
                               "built; build a new plan (q3r.ops keys its cached plans by them)")

    def _index(self, n_blocks: int) -> None:
        self._where = [None] * n_blocks
        for gi, g in enumerate(self.groups):
            for j, i in enumerate(g["idx"]):
                self._where[i] = (gi, j)

    def _q3r_group(self, g: dict, table: list[list[int]], blocks: list[tuple], factors: list[tuple]) -> None:
        """Check a new Q3R group's factors and write their fields and its workspace."""
        if any(len(b) != 2 for b in blocks):
            raise ValueError(f"q3r_kernels: a block must be 2-D, got X of shape {next(b for b in blocks if len(b) != 2)}")
        g.update(blocks=blocks, shapes=[None] * len(blocks), workspace=None)
        g["shapes"], g["workspace"] = self._factor_fields(g, table, dict(enumerate(factors)))

    def _factor_fields(self, g: dict, table: list[list[int]], new: dict[int, tuple]):
        """Check the new factors of some rows j of a Q3R group, then write the fields that
        depend on them into ``table`` (the group's rows, in place). Returns (shapes,
        workspace) for the whole group; raises before writing anything."""
        n = g["n_factors"]
        for j, f in new.items():
            if f is None or len(f) != n:
                raise ValueError(f"q3r_kernels: a Q3R block needs {n} factor tensors, got "
                                 f"{None if f is None else len(f)}; the layout changed: build a new plan")
            m.check_block_factors(g["blocks"][j], self.device, *f[:3])
            if n == 4 and (f[3].numel() != 1 or f[3].dtype != torch.float32 or f[3].device != self.device):
                raise ValueError("q3r_kernels: eps must be a one-element float32 tensor on the device of its block")
        shapes = list(g["shapes"])
        for j, f in new.items():
            shapes[j] = g["blocks"][j] + (f[0].shape[1],)
        ws, moved = g["workspace"], g["workspace"] is None or g["workspace"].shapes != shapes
        if moved:  # a new width moves the pieces of every block after it
            ws = m.Workspace(shapes, self.device, allocate=False)
        for j in range(len(table)) if moved else new:
            put_workspace_fields(table[j], ws, j)
        for j, f in new.items():
            put_factor_fields(table[j], f[0], f[1])
            table[j][m.F_DSRC] = f[2].data_ptr()
            if n == 4:
                table[j][m.F_EPS] = f[3].data_ptr()
        return shapes, ws

    def update_factors(self, new: dict[int, tuple]) -> None:
        """Point the plan at new factors after a refresh: new[i] is block i's (U, V, d) or
        (U, V, sigma, eps); blocks not named keep theirs.

        Only the rows of those blocks, the workspace (when a width changed) and the shapes the
        preparation launches are scheduled from are rewritten; the tile schedules of the main
        launch depend on rows and columns only. Everything is checked before anything is
        written, so a bad factor raises ValueError and leaves the plan as it was.
        """
        self.check_settings()
        by_group: dict[int, dict[int, tuple]] = {}
        for i, f in new.items():
            gi, j = self._where[i] if 0 <= i < len(self._where) else (None, None)
            if gi is None or not self.groups[gi]["n_factors"]:
                raise ValueError(f"q3r_kernels: block {i} of this plan has no Q3R term; "
                                 "the layout changed: build a new plan")
            by_group.setdefault(gi, {})[j] = f
        staged = []
        for gi, rows in by_group.items():
            g = self.groups[gi]
            table = g["host"].tolist()
            shapes, ws = self._factor_fields(g, table, rows)
            staged.append((g, shapes, ws, torch.tensor(table, dtype=torch.int64)))
        for g, shapes, ws, host in staged:  # every group checked: commit (sent at the next run)
            g.update(shapes=shapes, workspace=ws, host=host, sent=None)

    def run_table(self, g: dict, column_values: dict[int, list[int]]):
        """The device table of a group for this run, and the workspace buffer that must stay
        referenced until the launches are queued. ``column_values`` sets per-run columns
        (addresses that change from step to step). The table is sent only when these inputs
        differ from the last run's (``sent``; None after update_factors rewrote the rows)."""
        buffer = None
        if g["workspace"] is not None:
            buffer = torch.empty(g["workspace"].total, dtype=torch.float32, device=self.device)
        # in a steady loop nothing changes from run to run: compare the inputs, not the table
        inputs = (tuple((col, tuple(values)) for col, values in column_values.items()),
                  0 if buffer is None else buffer.data_ptr())
        if g.get("sent") is not None and g["sent"] == inputs:
            return g["table"], buffer
        host = g["host"].clone()
        for col, values in column_values.items():
            host[:, col] = torch.tensor(values, dtype=torch.int64)
        if buffer is not None:
            host[:, m.WORKSPACE_COLUMNS] += buffer.data_ptr()
        g["table"], g["sent"] = m.to_device_table(host, torch.int64, self.device), inputs
        return g["table"], buffer
