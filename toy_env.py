"""A tiny text gridworld for agentic RL, with an oracle and a held-out split.

    . . # .
    . A . .          A  the agent        #  a wall (cells outside the grid are walls too)
    . # . G          G  the goal         .  floor
    . . . .
    action:

The agent answers with one of four words -- ``up``, ``down``, ``left``, ``right`` -- as free text.
The reward is outcome-only: 1.0 when the agent stands on the goal within the step budget, else 0.0.

Why it looks like this: every observation of a layout is the same grid with the ``A`` in another
cell, so prompts of different states are near-identical and the action space is tiny. That is
exactly where the *gradient coupling* of arXiv 2509.23870 lives (a step that reinforces a move in
one state also reinforces it in its near-twin), so we add nothing (coordinates, hints) that would
make states trivially distinguishable.

The oracle (breadth-first distances to the goal) labels each action good (it strictly lowers the
distance) or flawed (a step away, a bump into a wall, text that is not an action). It feeds the
diagnostics, the supervised warm-up and the oracle-label ablation -- never the RL reward.

API (gym-like):
    env = GridWorld.from_string(layout_text)     # ValueError with a clear message if malformed
    obs = env.reset()
    obs, reward, done, info = env.step("left")   # never raises on any action text
    sample_layouts("train" | "held_out", n, seed)  -> list of layout strings
Every public function checks its arguments: bad ones raise ValueError with a clear message.
"""

from __future__ import annotations

from collections import deque

import numpy as np

ACTIONS = ("up", "down", "left", "right")
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
WALL, FLOOR, AGENT, GOAL = "#", ".", "A", "G"
PROMPT_END = "action:"
# Every word an observation or an action can contain: the word-level tokenizer is built from it.
VOCABULARY = (WALL, FLOOR, AGENT, GOAL, "\n", PROMPT_END) + ACTIONS
# The task in words, as the system turn of a chat prompt (instruct models): the environment's own
# text, so a trainer given another environment never puts this one's rules into its prompts.
CHAT_SYSTEM = (
    "You move the agent A on a grid to the goal G. '#' is a wall, '.' is floor, and everything "
    "outside the grid is wall too. Each turn you see the grid; answer with one word: up, down, "
    "left or right."
)

# Same grid size in both splits (the tiny model learns absolute positions), but held-out layouts are
# denser in walls, so detours are needed more often: our out-of-domain tasks. The wall-count ranges
# do not overlap, so no held-out layout can ever be a train layout, for any seed.
SPLITS = {
    "train": dict(rows=4, cols=4, min_walls=1, max_walls=3, split_id=0),
    "held_out": dict(rows=4, cols=4, min_walls=4, max_walls=5, split_id=1),
}
BUDGET_SLACK = 2  # one step away (and back) or two bumps still succeed, a third wasted step fails
MAX_LAYOUTS = 20_000  # per request; each split has tens of thousands of distinct layouts
# The shortest path from A to G in sampled layouts; shorter is too easy to teach anything.
MIN_START_DISTANCE = 3


def parse_action(text) -> str | None:
    """The action named by `text`, or None. Lenient about case and surrounding whitespace only."""
    word = text.strip().lower() if isinstance(text, str) else None
    return word if word in MOVES else None


def bfs_distances(walls: list[list[bool]], goal: tuple[int, int]) -> dict[tuple[int, int], int]:
    """Shortest-path distance (in moves) from every cell that can reach `goal`."""
    rows, cols = len(walls), len(walls[0])
    dist = {goal: 0}
    queue = deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < rows and 0 <= nc < cols and not walls[nr][nc] and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                queue.append((nr, nc))
    return dist


class GridWorld:
    """One layout: walls, a goal, the agent's start. Budget: shortest path + BUDGET_SLACK."""

    def __init__(
        self,
        walls: list[list[bool]],
        start: tuple[int, int],
        goal: tuple[int, int],
        max_steps: int | None = None,
    ):
        if not walls or not walls[0] or any(len(row) != len(walls[0]) for row in walls):
            raise ValueError("walls must be a non-empty rectangular list of rows")
        self.walls, self.goal = walls, goal
        self.rows, self.cols = len(walls), len(walls[0])
        for name, pos in (("goal", goal), ("start", start)):
            if not self.is_floor(pos):
                raise ValueError(
                    f"the {name} {pos!r} is not a (row, col) floor cell "
                    f"of the {self.rows}x{self.cols} grid"
                )
        self.distance = bfs_distances(walls, goal)  # the oracle
        if start not in self.distance:
            raise ValueError("the goal is unreachable from the agent's start")
        self.start = start
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.max_steps = max_steps if max_steps is not None else self.distance[start] + BUDGET_SLACK
        if self.distance[start] > self.max_steps:
            raise ValueError(
                f"the goal is {self.distance[start]} moves away "
                f"but the budget is {self.max_steps} steps"
            )
        self.reset()

    @classmethod
    def from_string(cls, text: str, max_steps: int | None = None) -> "GridWorld":
        """Parse rows separated by newlines: '#' wall, '.' floor, 'A' agent start, 'G' goal."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("layout is empty")
        lines = [line.strip() for line in text.strip().splitlines()]
        width = len(lines[0])
        walls, agents, goals = [], [], []
        for r, line in enumerate(lines):
            if len(line) != width:
                raise ValueError(
                    f"layout rows are ragged: row {r} has {len(line)} cells, row 0 has {width}"
                )
            for c, ch in enumerate(line):
                if ch not in (WALL, FLOOR, AGENT, GOAL):
                    raise ValueError(
                        f"unknown character {ch!r} at row {r}, column {c} (allowed: # . A G)"
                    )
                agents += [(r, c)] if ch == AGENT else []
                goals += [(r, c)] if ch == GOAL else []
            walls.append([ch == WALL for ch in line])
        if len(agents) != 1:
            raise ValueError(f"layout needs exactly one 'A' (agent start), found {len(agents)}")
        if len(goals) != 1:
            raise ValueError(f"layout needs exactly one 'G' (goal), found {len(goals)}")
        return cls(walls, agents[0], goals[0], max_steps)

    def is_floor(self, pos) -> bool:
        return (
            isinstance(pos, tuple)
            and len(pos) == 2
            and all(isinstance(x, int) for x in pos)
            and 0 <= pos[0] < self.rows
            and 0 <= pos[1] < self.cols
            and not self.walls[pos[0]][pos[1]]
        )

    def check_pos(self, pos) -> tuple[int, int]:
        """`pos` itself if the agent can stand there: a floor cell that can reach the goal."""
        if not (self.is_floor(pos) and pos in self.distance):
            raise ValueError(
                f"{pos!r} is not a (row, col) floor cell of this layout "
                "from which the goal is reachable"
            )
        return pos

    def cell(self, pos: tuple[int, int], agent: tuple[int, int]) -> str:
        """The character of one cell: the agent, the goal, a wall or floor."""
        if pos == agent:
            return AGENT
        if pos == self.goal:
            return GOAL
        return WALL if self.walls[pos[0]][pos[1]] else FLOOR

    def to_string(self, agent: tuple[int, int] | None = None) -> str:
        """The layout as `from_string` reads it, with the agent at `agent` (default: the start)."""
        agent = self.start if agent is None else self.check_pos(agent)
        rows = [
            "".join(self.cell((r, c), agent) for c in range(self.cols)) for r in range(self.rows)
        ]
        return "\n".join(rows)

    def observation(self, agent: tuple[int, int] | None = None) -> str:
        """The text the policy reads: the grid, cells separated by spaces, then 'action:'."""
        grid = self.to_string(self.pos if agent is None else agent)
        return "\n".join(" ".join(row) for row in grid.split("\n")) + "\n" + PROMPT_END

    # ---- dynamics --------------------------------------------------------------------------------
    def reset(self, agent: tuple[int, int] | None = None) -> str:
        """Start an episode (at the layout's start, or at any reachable non-goal cell `agent`)."""
        if agent is not None and self.check_pos(agent) == self.goal:
            raise ValueError("an episode cannot start on the goal")
        self.pos = self.start if agent is None else agent
        self.steps, self.done = 0, False
        return self.observation()

    def next_pos(self, pos: tuple[int, int], action: str) -> tuple[int, int]:
        """Where `action` leads from `pos`; a wall or the grid's edge leaves the agent in place."""
        r, c = pos[0] + MOVES[action][0], pos[1] + MOVES[action][1]
        inside = 0 <= r < self.rows and 0 <= c < self.cols
        return (r, c) if inside and not self.walls[r][c] else pos

    def is_good(self, action_text, pos: tuple[int, int] | None = None) -> bool:
        """Oracle label: the action strictly lowers the shortest-path distance to the goal."""
        pos = self.pos if pos is None else self.check_pos(pos)
        action = parse_action(action_text)
        return action is not None and self.distance[self.next_pos(pos, action)] < self.distance[pos]

    def heads_for_goal(self, action: str, pos: tuple[int, int] | None = None) -> bool:
        """Does `action` point toward the goal as the crow flies (walls ignored)? A bump that does
        is the coupled error: without this wall the move would usually be good."""
        pos = self.pos if pos is None else self.check_pos(pos)
        (dr, dc), (gr, gc) = MOVES[action], self.goal
        before = abs(gr - pos[0]) + abs(gc - pos[1])
        return abs(gr - pos[0] - dr) + abs(gc - pos[1] - dc) < before

    def good_actions(self, pos: tuple[int, int] | None = None) -> list[str]:
        return [a for a in ACTIONS if self.is_good(a, pos)]

    def step(self, action_text) -> tuple[str, float, bool, dict]:
        """Apply free-text `action_text` (or None). Unparseable: the agent stays; the step counts.
        info holds the oracle's view of the state the agent acted in (diagnostics only)."""
        if self.done:
            raise RuntimeError("the episode is over; call reset()")
        action = parse_action(action_text)
        info = dict(
            valid=action is not None,
            good=self.is_good(action_text),  # the oracle's label of this action here
            good_actions=tuple(self.good_actions()),  # every action it calls good here
            cell=self.pos,  # where the agent stood when it acted
            action=action,
        )
        if action is not None:
            self.pos = self.next_pos(self.pos, action)
        self.steps += 1
        success = self.pos == self.goal
        self.done = success or self.steps >= self.max_steps
        info.update(success=success, steps=self.steps)
        return self.observation(), float(success), self.done, info

    def free_cells(self) -> list[tuple[int, int]]:
        """Cells the agent can stand on that can reach the goal, goal excluded (for the warm-up)."""
        return sorted(p for p in self.distance if p != self.goal)


def _check_args(split, n, seed) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LAYOUTS:
        raise ValueError(f"n must be an integer from 0 to {MAX_LAYOUTS}, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


# ---- layouts -------------------------------------------------------------------------------------
def random_layout(rng: np.random.Generator, rows: int, cols: int, num_walls: int) -> str | None:
    """One random layout, or None when the draw is unsolvable or too easy."""
    cells = rng.permutation(rows * cols)[: num_walls + 2]
    walls = [[False] * cols for _ in range(rows)]
    for i in cells[:num_walls]:
        walls[i // cols][i % cols] = True
    start, goal = divmod(int(cells[-2]), cols), divmod(int(cells[-1]), cols)
    distance = bfs_distances(walls, goal)
    if distance.get(start, 0) < MIN_START_DISTANCE:  # 0: unreachable
        return None
    return GridWorld(walls, start, goal).to_string()


def sample_layouts(split: str, n: int, seed: int) -> list[str]:
    """`n` distinct solvable layouts of `split` ("train" or "held_out"), deterministic in `seed`."""
    _check_args(split, n, seed)
    spec = SPLITS[split]
    # one independent stream per (seed, split)
    rng = np.random.default_rng([seed, spec["split_id"]])
    layouts, seen, misses = [], set(), 0
    while len(layouts) < n:
        if misses > 20_000:  # a finite grid has finitely many layouts: never loop for ever
            raise ValueError(
                f"found only {len(layouts)} distinct {split} layouts, {n} were asked for"
            )
        num_walls = int(rng.integers(spec["min_walls"], spec["max_walls"] + 1))
        layout = random_layout(rng, spec["rows"], spec["cols"], num_walls)
        misses = misses + 1 if layout is None or layout in seen else 0
        if not misses:
            seen.add(layout)
            layouts.append(layout)
    return layouts


def split_of(layout: str) -> str:
    """Which split a layout belongs to, from its wall count (the splits' ranges are disjoint)."""
    walls = layout.count(WALL) if isinstance(layout, str) else -1
    for name, spec in SPLITS.items():
        if spec["min_walls"] <= walls <= spec["max_walls"]:
            return name
    return "neither"


def coupled_pairs(split: str, n: int, seed: int) -> list[tuple[str, str, str]]:
    """`n` (layout_good, layout_flawed, action) triples for the gradient-coupling probe.

    The two layouts differ in exactly one cell: the cell that `action` leads to from the agent is
    floor in the first (the action is good: it shortens the path) and a wall in the second (the same
    action bumps into it: flawed). Near-identical prompts, same action, opposite labels -- the
    situation in which the paper says reinforcing one can strengthen the other.
    """
    _check_args(split, n, seed)
    rng = np.random.default_rng([seed, SPLITS[split]["split_id"], 7])
    pairs = []
    for layout in sample_layouts(split, min(50 * n, MAX_LAYOUTS), seed):
        env = GridWorld.from_string(layout)
        pos = env.start
        options = [a for a in env.good_actions(pos) if env.next_pos(pos, a) != env.goal]
        if not options:
            continue
        action = options[rng.integers(len(options))]
        r, c = env.next_pos(pos, action)
        walls = [row[:] for row in env.walls]
        walls[r][c] = True
        if pos not in bfs_distances(walls, env.goal):  # the new wall must not cut the agent off
            continue
        flawed = GridWorld(walls, pos, env.goal, max_steps=10**6)
        pairs.append((layout, flawed.to_string(), action))
        if len(pairs) == n:
            break
    return pairs
