"""What a compiled program does per step, read from its optimized HLO text.

XLA's own cost analysis counts the body of a loop once, and the encoder is a loop over its
layers (a `lax.scan`): every figure here weighs each computation by how often one step runs
it, the trip counts of the loops that call it multiplied out.

Two figures come out: the collectives (count and bytes, by kind) and an estimate of the bytes
the program moves through device memory: every instruction outside a fusion reads its operands
and writes its result once, except that slicing one layer out of a stacked buffer reads only
the slice and an in-place update writes only the update (also inside a fusion); buffers the
compiler placed in on-chip memory are left out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterator

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Bytes each device sends per byte of the collective's full buffer, for a group of n devices
# (ring algorithms): an all-reduce is a reduce-scatter followed by an all-gather.
_LINK_FACTOR = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
                "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
                "collective-permute": lambda n: 1.0}
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
# Instructions that move no data of their own (or whose data is counted where it is used).
_STRUCTURAL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "call", "conditional", "after-all", "partition-id", "replica-id",
               "opt-barrier", "async-start", "async-update", "async-done", "copy-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "add-dependency",
               "send-done", "recv-done", "domain"}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?(%[\w.\-]+)\s")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?(%[\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(pred|[sucf]\d+|bf16|f8\w*)\[([\d,]*)\](\{[^}]*\})?")
_NAME = re.compile(r"%[\w.\-]+")
_CALLS = re.compile(r"\b(calls|body|condition|branch_computations|true_computation)=")


@dataclasses.dataclass
class Collective:
  count: int = 0
  bytes: float = 0.0
  link_bytes: float = 0.0  # what each device sends over its links (ring algorithms)


@dataclasses.dataclass(frozen=True)
class ProgramTraffic:
  collectives: dict[str, Collective]
  memory_bytes: float  # device memory read and written per step (estimate)

  @property
  def link_bytes(self) -> float:
    return sum(c.link_bytes for c in self.collectives.values())


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  type: str
  opcode: str
  operands: tuple[str, ...]
  args: str   # the text between the opcode's parentheses (a constant's value)
  attrs: str
  callees: tuple[tuple[str, str], ...]  # (computation, how: calls | body | condition | branch)
  root: bool = False


def _array_bytes(text: str, hbm_only: bool = False) -> float:
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(text):
    if hbm_only and layout and "S(" in layout and "S(0)" not in layout:
      continue  # placed in on-chip memory by the compiler's memory-space assignment
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _split_type(rest: str) -> tuple[str, str]:
  """('(tuple) type' or 'array type', the rest) of an instruction's right-hand side."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _instruction(line: str) -> _Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  type_, rest = _split_type(m.group(3))
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  end = rest.find(")", op.end())
  if "(" in rest[op.end():end]:  # nested parentheses (a tuple constant): match them
    depth = 0
    for i in range(op.end() - 1, len(rest)):
      depth += rest[i] == "("
      depth -= rest[i] == ")"
      if depth == 0:
        end = i
        break
  args, attrs = rest[op.end():end], rest[end + 1:]
  return _Instruction(m.group(2), type_, op.group(1), tuple(_NAME.findall(args)), args, attrs,
                      tuple(_callees(attrs)) if _CALLS.search(attrs) else (), bool(m.group(1)))


def computations(text: str) -> tuple[str, dict[str, list[_Instruction]]]:
  """(entry name, {computation name: instructions}) of an HLO module's text."""
  comps: dict[str, list[_Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and line.rstrip().endswith("{"):
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    ins = _instruction(line)
    if ins is not None:
      comps[current].append(ins)
  return entry, comps


def _trip_count(ins: _Instruction, comps) -> int:
  """A while loop's iterations: XLA's own count when it records one, else the bound its
  condition compares the counter with (a scan counts from 0 in steps of 1)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=(%[\w.\-]+)", ins.attrs)
  body = comps.get(cond.group(1), []) if cond else []
  consts = {i.name: i.args for i in body if i.opcode == "constant"}
  for c in body:
    if c.opcode == "compare" and "direction=LT" in c.attrs:
      for name in c.operands:
        if re.fullmatch(r"-?\d+", consts.get(name, "").strip()):
          return max(int(consts[name]), 0)
  return 1


def _callees(attrs: str) -> Iterator[tuple[str, str]]:
  """(computation, how it is called) for each computation an instruction runs."""
  for key in ("calls", "body", "condition"):
    for m in re.finditer(rf"\b{key}=(%[\w.\-]+)", attrs):
      yield m.group(1), key
  m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
  if m:
    for name in _NAME.findall(m.group(1)):
      yield name, "branch"
  for key in ("true_computation", "false_computation"):
    m = re.search(rf"\b{key}=(%[\w.\-]+)", attrs)
    if m:
      yield m.group(1), "branch"


def executions(entry: str, comps) -> tuple[dict[str, float], set[str]]:
  """({computation: times one run of the program runs it}, the fused computations)."""
  runs: dict[str, float] = collections.defaultdict(float)
  fused: set[str] = set()
  order: list[str] = []
  seen: set[str] = set()

  def visit(name: str) -> None:  # callers before callees
    if name in seen or name not in comps:
      return
    seen.add(name)
    for ins in comps[name]:
      for callee, _ in ins.callees:
        visit(callee)
    order.append(name)

  visit(entry)
  runs[entry] = 1.0
  for name in reversed(order):
    for ins in comps[name]:
      for callee, how in ins.callees:
        times = _trip_count(ins, comps) if how in ("body", "condition") else 1
        runs[callee] += runs[name] * times
        if how == "calls" and ins.opcode == "fusion":
          fused.add(callee)
  return dict(runs), fused


def _group_size(attrs: str, default: int) -> int:
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x.strip()])
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", m.group(2)))
  return default


def _collective_kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in KINDS else None


_SLICES = ("dynamic-slice", "slice", "gather")


def _fusion_access(name: str, comps, size, memo: dict) -> tuple[dict[int, float], float | None]:
  """What fused computation `name` really moves: ({parameter index: bytes read} for the
  parameters it only slices (one layer of a stacked buffer, also inside a nested fusion) or
  updates in place, bytes written when its result is an in-place update of a slice (None: the
  whole result))."""
  if name in memo:
    return memo[name]
  body = comps.get(name, [])
  by_name = {ins.name: ins for ins in body}
  users: dict[str, list[tuple[_Instruction, int]]] = {}
  for ins in body:
    for j, o in enumerate(ins.operands):
      users.setdefault(o, []).append((ins, j))

  def partial_read(value: str) -> float | None:
    """Bytes read from `value` when every use takes only a part of it; None: all of it."""
    total = 0.0
    for u, j in users.get(value, []):
      if u.opcode == "bitcast":
        part = partial_read(u.name)
      elif u.opcode in _SLICES and j == 0:
        part = size(u.name)
      elif u.opcode == "dynamic-update-slice" and j == 0:
        part = 0.0  # the buffer updated in place
      elif u.opcode == "fusion" and u.callees:
        part = _fusion_access(u.callees[0][0], comps, size, memo)[0].get(j)
      else:
        part = None
      if part is None:
        return None
      total += part
    return total if users.get(value) else None

  reads = {}
  for ins in body:
    if ins.opcode == "parameter" and ins.args.strip().isdigit():
      part = partial_read(ins.name)
      if part is not None:
        reads[int(ins.args)] = part

  def written(ins: _Instruction | None) -> float | None:
    """Bytes the value `ins` writes: a slice for an in-place update, else all of it."""
    start = ins
    while ins is not None and ins.opcode == "bitcast":
      ins = by_name.get(ins.operands[0])
    if ins is None:
      return None
    if ins.opcode == "dynamic-update-slice":
      return size(ins.operands[1])
    if ins.opcode == "tuple":
      parts = [written(by_name.get(o)) for o in ins.operands]
      return None if any(p is None for p in parts) else sum(parts)
    return size(start.name)

  memo[name] = (reads, written(next((ins for ins in body if ins.root), None)))
  return memo[name]


def analyse(text: str, num_devices: int) -> ProgramTraffic:
  """Collectives and memory traffic of one step of the compiled program `text`."""
  entry, comps = computations(text)
  types = {ins.name: ins.type for body in comps.values() for ins in body}
  runs, fused = executions(entry, comps)
  sizes: dict[str, tuple[float, float]] = {}

  def size(name: str) -> tuple[float, float]:  # (all bytes, bytes in device memory)
    if name not in sizes:
      t = types.get(name, "")
      sizes[name] = (_array_bytes(t), _array_bytes(t, hbm_only=True))
    return sizes[name]

  access: dict[str, tuple[dict[int, float], float | None]] = {}

  def _moved(ins: _Instruction) -> float:
    """Device-memory bytes one execution of `ins` reads and writes."""
    hbm = lambda n: size(n)[1]
    reads = [hbm(o) for o in ins.operands]
    write: float | None = None
    if ins.opcode in _SLICES and reads:
      reads[0] = hbm(ins.name)  # reads the slice it returns
    elif ins.opcode == "dynamic-update-slice" and len(reads) > 1:
      reads[0], write = 0.0, reads[1]
    elif ins.opcode == "fusion" and ins.callees:
      partial, write = _fusion_access(ins.callees[0][0], comps, hbm, access)
      reads = [partial.get(i, r) for i, r in enumerate(reads)]
    return sum(reads) + (hbm(ins.name) if write is None else write)

  out = {k: Collective() for k in KINDS}
  memory = 0.0
  for name, body in comps.items():
    times = runs.get(name, 0.0)
    if not times:
      continue
    for ins in body:
      kind = _collective_kind(ins.opcode)
      if kind is not None:
        operand_bytes = sum(size(o)[0] for o in ins.operands)
        result_bytes = size(ins.name)[0]
        if ins.opcode.endswith("-start") and ins.type.startswith("("):
          result_bytes -= operand_bytes  # (operands..., results...[, context])
        full = operand_bytes if kind in ("reduce-scatter", "collective-permute") else max(
            result_bytes, 0.0)
        n = _group_size(ins.attrs, num_devices)
        c = out[kind]
        c.count += int(times)
        c.bytes += times * full
        c.link_bytes += times * full * (_LINK_FACTOR[kind](n) if n > 1 else 0.0)
      if name in fused or ins.opcode in _STRUCTURAL or ins.opcode.endswith("-done"):
        continue
      memory += times * _moved(ins)
  return ProgramTraffic(out, memory)
