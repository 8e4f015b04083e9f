"""Requests refused by a project's limits, counted in Redis so that every API process adds to
the same figures and reads the same sums (the dashboard, served by any one process, shows the
whole fleet's refusals; a per-process counter would show only its own).

Each refusal adds one to a total (never reset but with Redis itself: /metrics exposes it as a
counter) and to its minute's count (kept a little over an hour: the dashboard's last hour). A
refusal is counted by the script that refuses it (api.rate_limits) or, for a batch that does
not fit in its project's batch queue, by `count` as the batch fails.
"""

from dataclasses import dataclass, field

import redis.asyncio as aioredis

# Every refusal so far: hash project NUL model NUL limit -> count.
TOTALS_KEY = "ferry:throttled"
# One hash like it per minute (Unix minute appended), for the last hour.
MINUTE_PREFIX = "ferry:throttled:minute:"
MINUTES = 60
# The limits a refusal names, as `ferry projects limits` calls them.
LIMITS = ("rpm", "tpm", "max_concurrent", "batch_queue_tokens")

# ARGS: the refusal's field (project NUL model NUL limit). Uses Redis' clock, the same for every
# API process. The minute's key is made here, from that clock: one Redis, not a cluster.
COUNT_LUA = """
local function count_refusal(totals, prefix, what)
  local now = redis.call('TIME')
  local minute = prefix .. math.floor(tonumber(now[1]) / 60)
  redis.call('HINCRBY', totals, what, 1)
  redis.call('HINCRBY', minute, what, 1)
  redis.call('EXPIRE', minute, 3720)
end
"""

_COUNT = COUNT_LUA + "count_refusal(KEYS[1], ARGV[1], ARGV[2])\nreturn 1\n"

# KEYS: totals. ARGV: minute prefix, minutes. Returns the totals hash, flat, and the sums over
# the last `minutes` minutes (this one included), flat.
_READ = """
local now = redis.call('TIME')
local minute = math.floor(tonumber(now[1]) / 60)
local sums, order = {}, {}
for m = minute - tonumber(ARGV[2]) + 1, minute do
  local v = redis.call('HGETALL', ARGV[1] .. m)
  for i = 1, #v, 2 do
    if not sums[v[i]] then sums[v[i]] = 0; order[#order + 1] = v[i] end
    sums[v[i]] = sums[v[i]] + tonumber(v[i + 1])
  end
end
local recent = {}
for _, k in ipairs(order) do recent[#recent + 1] = k; recent[#recent + 1] = sums[k] end
return {redis.call('HGETALL', KEYS[1]), recent}
"""


def field_of(project: str, model: str, limit: str) -> str:
    return f"{project}\x00{model}\x00{limit}"


@dataclass
class Throttled:
    """Refusals per (project, model, limit): all of them, and those of the last hour."""

    total: dict[tuple[str, str, str], int] = field(default_factory=dict)
    last_hour: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def of(self, project: str) -> "Throttled":
        return Throttled(
            {k: n for k, n in self.total.items() if k[0] == project},
            {k: n for k, n in self.last_hour.items() if k[0] == project},
        )


async def count(redis: aioredis.Redis, project: str, model: str, limit: str) -> None:
    """Count one refusal (the batch queue's: the rate limiter's script counts its own)."""
    await redis.eval(_COUNT, 1, TOTALS_KEY, MINUTE_PREFIX, field_of(project, model, limit))


async def read(redis: aioredis.Redis) -> Throttled:
    """Every project's refusals, in one round trip."""
    totals, recent = await redis.eval(_READ, 1, TOTALS_KEY, MINUTE_PREFIX, MINUTES)
    return Throttled(_pairs(totals), _pairs(recent))


def _pairs(flat: list[bytes | str | int]) -> dict[tuple[str, str, str], int]:
    found: dict[tuple[str, str, str], int] = {}
    for raw, n in zip(flat[::2], flat[1::2], strict=True):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        project, model, limit = text.split("\x00")
        found[project, model, limit] = int(n)
    return found
