"""A minimum s-t cut (Dinic's max flow) on a small integer-capacity graph.

The placement pass (`sharding.placement`) asks one question of it: which values to move between
host and device so that the moved bytes are fewest. Vertices are ints `0..n-1`.
"""
from __future__ import annotations

from collections import deque

INFINITE = 1 << 62


class FlowGraph:
    def __init__(self, num_vertices: int):
        self.heads: list[list[int]] = [[] for _ in range(num_vertices)]  # vertex -> edge ids
        self.to: list[int] = []
        self.capacity: list[int] = []

    def add_edge(self, source: int, target: int, capacity: int) -> None:
        """A directed edge (its reverse, of capacity 0, carries the residual)."""
        for a, b, c in ((source, target, capacity), (target, source, 0)):
            self.heads[a].append(len(self.to))
            self.to.append(b)
            self.capacity.append(c)

    def source_side(self, source: int, sink: int) -> set[int]:
        """The vertices on the source side of a minimum cut: the smallest such set (those the
        source still reaches in the residual graph after a maximum flow)."""
        while True:
            level = self._levels(source)
            if level[sink] < 0:
                break
            cursor = [0] * len(self.heads)
            while self._push(source, sink, INFINITE, level, cursor):
                pass
        level = self._levels(source)
        return {v for v, depth in enumerate(level) if depth >= 0}

    def _levels(self, source: int) -> list[int]:
        level = [-1] * len(self.heads)
        level[source] = 0
        queue = deque([source])
        while queue:
            v = queue.popleft()
            for edge in self.heads[v]:
                if self.capacity[edge] > 0 and level[self.to[edge]] < 0:
                    level[self.to[edge]] = level[v] + 1
                    queue.append(self.to[edge])
        return level

    def _push(self, source: int, sink: int, limit: int, level: list[int], cursor: list[int]) -> int:
        """One augmenting path along the level graph (iterative DFS); the flow it carried (0: none left)."""
        path: list[int] = []  # edge ids from source
        v = source
        while True:
            if v == sink:
                flow = min([limit] + [self.capacity[e] for e in path])
                for edge in path:
                    self.capacity[edge] -= flow
                    self.capacity[edge ^ 1] += flow
                return flow
            edges = self.heads[v]
            while cursor[v] < len(edges):
                edge = edges[cursor[v]]
                if self.capacity[edge] > 0 and level[self.to[edge]] == level[v] + 1:
                    break
                cursor[v] += 1
            if cursor[v] == len(edges):  # dead end: retreat
                if not path:
                    return 0
                level[v] = -1
                edge = path.pop()
                v = self.to[edge ^ 1]
                cursor[v] += 1
                continue
            edge = edges[cursor[v]]
            path.append(edge)
            v = self.to[edge]
