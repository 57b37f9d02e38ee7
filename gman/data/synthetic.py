"""The built-in synthetic road network: ``make_synthetic(seed=0, ...) -> SensorDataset``.

Data card
---------
**What**: average speeds (mph) of ``num_sensors`` loop detectors on a small
directed freeway network, every ``interval_minutes`` (5) for ``days`` days from
Monday 2023-10-02 00:00. Generated from ``seed`` by numpy's ``Generator(PCG64)``
only (no torch RNG, no set or dict iteration order), so a seed gives the same
data on every run and platform (up to the last bits of ``exp``; the mask of
missing readings is exactly reproducible). 64 sensors x 28 days: 8,064 steps,
~0.2 s to generate.

**Network**: five one-way freeways split into 0.5-km cells: an inbound system
(trunk A, with B and C merging into it) and an outbound one (trunk D, with E
merging into it). Bottlenecks: every merge, a lane drop near the end of each
trunk, and one or two geometric bottlenecks (grade, curve, weaving) per
corridor. Sensors sit 0.5-2 km apart along the corridors, ids ``A01`` ...
(corridor letter, number in the direction of travel). The adjacency is
DCRNN's Gaussian kernel of the directed road distances between sensors,
``A[i, j] = exp(-(d_ij / sigma)^2)`` for ``j`` downstream of ``i``
(``sigma`` = std of the finite distances, weights < 0.1 dropped, diagonal 1).

**Traffic** (a kinematic-wave model of queues; speeds in mph):

    speed_i(t) = free_i(t) * (1 - max_e drop_e,i(t))  + bias_i + noise

- ``free_i(t)``: the sensor's free-flow speed (62-68 mph) minus a mild
  speed-flow effect that follows the day's demand profile (weekday AM and
  PM peaks: inbound peaks in the morning, outbound in the evening; lighter,
  flatter weekends).
- Congestion events ``e`` start at a cell (the queue's head): **recurrent**
  ones at bottlenecks around each weekday peak, when that day's demand
  (a random daily factor times the bottleneck's overload) exceeds its
  capacity, with severity, duration and queue reach growing with the excess;
  and **incidents** (Poisson, ~1.5 a day, anywhere, 06:00-21:00, 15-120 min).
  The head's intensity ``h_e(tau)`` rises, holds (with stop-and-go ripples:
  an AR(1) process) and recovers.
- **Shockwaves**: a sensor ``d`` km upstream of the head (along the directed
  network, across merges) sees the head's intensity ``d / c_e`` later, with
  ``c_e`` = 3-7 km/h (a queue's tail growing against mildly excessive demand),
  up to the queue's reach ``R_e`` (1-20 km):
  ``drop_e,i(t) = severity_e * h_e(t - start_e - d / c_e) * taper(d / R_e)``.
  Both the onset and the recovery travel upstream, so a sensor's downstream
  neighbours show now what it will show tens of minutes later; sensors
  downstream of the head are not slowed. Where queues overlap the deepest
  drop wins; the total drop is capped at 80 %. (A simplification: real
  recovery waves travel upstream faster than queue tails grow.)
- ``bias_i`` ~ N(0, 1.2) per sensor; ``noise`` ~ N(0, 2) mph per reading;
  clipped to [3, 85] mph.

**Missing readings**: recorded as **0** (the METR-LA / PEMS-BAY convention,
``missing_value=0``): isolated dropouts (~0.4 %), whole-hour outages (1-8 h,
starting on the hour) and, now and then, a sensor down for a day or two;
about 4-5 % of readings in all (4.7 % for the default seed).

**Figures** (default seed; 60-min-ahead MAE on the last 20 %, per-sensor least
squares fit on the first 70 %): last value 3.92 mph; own last 12 readings
3.62; own + downstream neighbours' last readings 3.09 (15 % lower). About 9 %
of weekday readings are below 40 mph, 0.5 % of weekend ones.

**Use**: the default ``dataset: synthetic``, so that training, evaluation and
serving work on any machine without files. A test bed with known mechanisms
(time-of-day patterns, upstream-travelling congestion, noise, gaps), not a
substitute for METR-LA or PEMS-BAY.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gman.data.dataset import SensorDataset
from gman.errors import ConfigError

START_TIME = "2023-10-02 00:00"  # a Monday
CELL_KM = 0.5
KMH_PER_MPH = 1.609344

# name, cells, (corridor it merges into, fraction of that corridor's length) or None, system
# system 0 = inbound (AM peak), 1 = outbound (PM peak)
_CORRIDORS = (
    ("A", 56, None, 0),
    ("B", 24, ("A", 0.32), 0),
    ("C", 20, ("A", 0.64), 0),
    ("D", 44, None, 1),
    ("E", 18, ("D", 0.32), 1),
)
_PEAK_HOURS = (7.75, 17.5)  # AM, PM peak centres
# Bottleneck overload (demand / capacity - 1) on an average weekday: (main peak, other peak)
_OVERLOAD_MAIN = (0.02, 0.08)
_OVERLOAD_OTHER = (-0.08, 0.06)
_DAILY_DEMAND_SD = 0.08
_INCIDENTS_PER_DAY = 1.5
_NOISE_MPH = 2.0
_SPREAD_KMH = (3.0, 7.0)
_WEEKEND_LOAD = 0.85
_MAX_DROP = 0.8
_REACH_PER_EXCESS = 140.0
_MAX_REACH_KM = 20.0


# ============================================================================ network

@dataclass
class RoadNetwork:
    """Cells of a directed freeway network, its bottlenecks and sensors.

    ``target`` [C]: downstream cell of each cell (C = leaves the network);
    ``corridor_of_cell`` [C]; ``system_of_cell`` [C] (0 inbound, 1 outbound);
    ``bottleneck_cells`` [B] with ``overload`` [B, 2] (AM, PM: weekday demand /
    capacity - 1); sensors: ``sensor_cell`` [N], ``sensor_ids`` [N],
    ``free_speed_mph`` [N]; ``sensor_to_cell_km`` [N, C]: road distance from a
    sensor downstream to a cell (inf if the cell is not downstream);
    ``distance_km`` [N, N]: the same between sensors.
    """

    target: np.ndarray
    corridor_of_cell: list[str]
    system_of_cell: np.ndarray
    bottleneck_cells: np.ndarray
    overload: np.ndarray
    sensor_cell: np.ndarray
    sensor_ids: list[str]
    free_speed_mph: np.ndarray
    sensor_to_cell_km: np.ndarray
    distance_km: np.ndarray

    @property
    def num_cells(self) -> int:
        return len(self.target)


def build_network(rng: np.random.Generator, num_sensors: int) -> RoadNetwork:
    """Random instance of the corridor template: lengths, bottlenecks, sensor positions."""
    names = [c[0] for c in _CORRIDORS]
    cells = {name: int(round(n * rng.uniform(0.85, 1.15))) for name, n, *_ in _CORRIDORS}
    first = {}
    offset = 0
    for name in names:
        first[name] = offset
        offset += cells[name]
    num_cells = offset

    target = np.full(num_cells, num_cells, dtype=np.int64)
    corridor_of_cell: list[str] = []
    system_of_cell = np.zeros(num_cells, dtype=np.int64)
    bottlenecks = []
    for name, _, merge, system in _CORRIDORS:
        start, n = first[name], cells[name]
        target[start : start + n - 1] = np.arange(start + 1, start + n)
        corridor_of_cell += [name] * n
        system_of_cell[start : start + n] = system
        if merge is not None:
            into, fraction = merge
            cell = first[into] + int(round(fraction * cells[into]))
            target[start + n - 1] = cell
            bottlenecks.append(cell)  # the merge
    for trunk in ("A", "D"):  # a lane drop near the end of each trunk (downtown / bridge)
        bottlenecks.append(first[trunk] + int(round(rng.uniform(0.8, 0.9) * cells[trunk])))
    for name in names:  # geometric bottlenecks (grade, curve, weaving): one or two per corridor
        for _ in range(1 + int(cells[name] > 30)):
            bottlenecks.append(first[name] + int(rng.integers(cells[name] // 4, cells[name] - 2)))
    bottlenecks = np.array(sorted(set(bottlenecks)), dtype=np.int64)
    main_peak = system_of_cell[bottlenecks]  # 0: AM is the main peak, 1: PM
    main = rng.uniform(*_OVERLOAD_MAIN, size=len(bottlenecks))
    other = rng.uniform(*_OVERLOAD_OTHER, size=len(bottlenecks))
    overload = np.where(main_peak[:, None] == 0, np.stack([main, other], 1), np.stack([other, main], 1))

    sensor_cell = _place_sensors(rng, num_sensors, names, first, cells)
    sensor_ids = []
    for name in names:
        on_corridor = [c for c in sensor_cell if corridor_of_cell[c] == name]
        sensor_ids += [f"{name}{k + 1:02d}" for k in range(len(on_corridor))]
    to_cell = _distances_to_cells(sensor_cell, target)
    return RoadNetwork(
        target=target,
        corridor_of_cell=corridor_of_cell,
        system_of_cell=system_of_cell,
        bottleneck_cells=bottlenecks,
        overload=overload,
        sensor_cell=sensor_cell,
        sensor_ids=sensor_ids,
        free_speed_mph=rng.uniform(62.0, 68.0, size=len(sensor_cell)),
        sensor_to_cell_km=to_cell,
        distance_km=to_cell[:, sensor_cell],
    )


def _place_sensors(rng, num_sensors: int, names, first, cells) -> np.ndarray:
    """Sensors per corridor in proportion to its length; evenly spaced plus jitter, one per cell at most."""
    total = sum(cells.values())
    if not len(names) * 2 <= num_sensors <= total // 2:
        raise ConfigError(f"num_sensors: must be between {len(names) * 2} and {total // 2}, got {num_sensors}")
    counts = {name: max(2, int(num_sensors * cells[name] / total)) for name in names}
    for name in sorted(names, key=lambda n: (-cells[n], n)):  # remainder to the longest corridors
        if sum(counts.values()) >= num_sensors:
            break
        counts[name] += 1
    while sum(counts.values()) > num_sensors:
        counts[max(names, key=lambda n: (counts[n], n))] -= 1
    chosen = []
    for name in names:
        n, count = cells[name], counts[name]
        spacing = n / count  # >= 2 cells: at most one sensor per km on average
        positions = (np.arange(count) + 0.5 + rng.uniform(-0.3, 0.3, size=count)) * spacing
        positions = np.clip(np.round(positions).astype(np.int64), 0, n - 1)
        for k in range(1, count):  # distinct and increasing
            positions[k] = max(positions[k], positions[k - 1] + 1)
        if positions[-1] > n - 1:  # pushed off the end: fall back to even spacing
            positions = np.floor((np.arange(count) + 0.5) * spacing).astype(np.int64)
        chosen.append(first[name] + positions)
    return np.concatenate(chosen)


def _distances_to_cells(sensor_cell: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[N, C] km along the directed network from each sensor to each cell downstream (inf elsewhere)."""
    num_cells = len(target)
    distance = np.full((len(sensor_cell), num_cells), np.inf)
    for i, cell in enumerate(sensor_cell):
        steps, cell = 0, int(cell)
        while cell < num_cells:
            distance[i, cell] = steps * CELL_KM
            cell, steps = int(target[cell]), steps + 1
    return distance


def sensor_adjacency(distance_km: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """DCRNN Gaussian kernel of the directed road distances (sigma = std of the finite ones)."""
    from gman.data.graph import gaussian_kernel

    return gaussian_kernel(distance_km, threshold=threshold)


# ============================================================================ demand and free flow

def demand_profile(hours: np.ndarray, day_of_week: int, system: int) -> np.ndarray:
    """Relative demand over a day ([I] for hours [I]); 1 at a weekday's main peak."""
    daytime = 1.0 / (1.0 + np.exp(-(hours - 6.0) / 0.6)) / (1.0 + np.exp((hours - 21.5) / 0.8))
    if day_of_week >= 5:  # weekend: a broad midday hump, Sunday lighter
        level = 0.62 if day_of_week == 5 else 0.55
        return 0.1 + level * daytime * (0.55 + 0.45 * np.exp(-0.5 * ((hours - 13.5) / 3.5) ** 2))
    am, pm = (0.45, 0.36) if system == 0 else (0.33, 0.45)
    am_peak = np.exp(-0.5 * ((hours - _PEAK_HOURS[0]) / 1.1) ** 2)
    pm_peak = np.exp(-0.5 * ((hours - _PEAK_HOURS[1]) / 1.2) ** 2)
    return (0.1 + 0.5 * daytime + am * am_peak + pm * pm_peak) / 1.05


# ============================================================================ congestion events

@dataclass
class CongestionEvent:
    """A queue whose head sits at ``cell``: starts at ``start`` (minutes from the series start),
    holds ``duration`` minutes, slows its head by ``severity`` (share of free-flow speed),
    spreads upstream at ``spread_kmh`` up to ``reach_km``."""

    cell: int
    start: float
    duration: float
    severity: float
    spread_kmh: float
    reach_km: float
    kind: str


def recurrent_events(rng, network: RoadNetwork, days: int, start_dow: int) -> list[CongestionEvent]:
    """Bottleneck queues around the weekday peaks; weekends only rarely and mildly."""
    events = []
    daily_factor = np.exp(rng.normal(0.0, _DAILY_DEMAND_SD, size=(days, 2)))
    peak_shift = rng.normal(0.0, 12.0, size=(days, 2, 2))  # minutes, per system and peak
    num_bottlenecks = len(network.bottleneck_cells)
    for d in range(days):
        weekend = (start_dow + d) % 7 >= 5
        for b in range(num_bottlenecks):
            cell = int(network.bottleneck_cells[b])
            system = int(network.system_of_cell[cell])
            for peak in (0, 1):
                load = (1.0 + network.overload[b, peak]) * daily_factor[d, system]
                if weekend:  # the weekend's midday hump is lower than a weekday peak
                    load *= _WEEKEND_LOAD
                excess = load - 1.0 + rng.normal(0.0, 0.02)
                if excess <= 0.0:
                    continue
                duration = float(np.clip(40.0 + 1000.0 * excess, 30.0, 200.0))
                centre = (13.5 if weekend else _PEAK_HOURS[peak]) * 60 + peak_shift[d, system, peak]
                events.append(CongestionEvent(
                    cell=cell,
                    start=d * 1440.0 + centre - duration * rng.uniform(0.55, 0.8),
                    duration=duration,
                    severity=float(np.clip(0.3 + 2.5 * excess, 0.25, 0.75)),
                    spread_kmh=float(rng.uniform(*_SPREAD_KMH)),
                    reach_km=float(np.clip(2.0 + _REACH_PER_EXCESS * excess, 1.5, _MAX_REACH_KM)),
                    kind="recurrent",
                ))
    return events


def incident_events(rng, network: RoadNetwork, days: int) -> list[CongestionEvent]:
    """Poisson incidents at random cells and times (06:00-21:00)."""
    events = []
    for d in range(days):
        for _ in range(rng.poisson(_INCIDENTS_PER_DAY)):
            duration = float(np.clip(rng.lognormal(np.log(40.0), 0.5), 15.0, 120.0))
            spread = float(rng.uniform(*_SPREAD_KMH))
            events.append(CongestionEvent(
                cell=int(rng.integers(0, network.num_cells)),
                start=d * 1440.0 + rng.uniform(6.0, 21.0) * 60.0,
                duration=duration,
                severity=float(rng.uniform(0.3, 0.7)),
                spread_kmh=spread,
                reach_km=float(np.clip(spread * (duration + 20.0) / 60.0 * rng.uniform(0.4, 0.9), 1.0, _MAX_REACH_KM)),
                kind="incident",
            ))
    return events


def _head_intensity(rng, duration: float, minutes: int) -> np.ndarray:
    """h(tau) for tau = 0..minutes-1: smooth rise (<= 15 min), hold with AR(1) ripples, 20-min recovery."""
    tau = np.arange(minutes, dtype=np.float64)
    rise = min(15.0, duration / 3.0)
    up = np.clip(tau / rise, 0.0, 1.0)
    down = np.clip((tau - duration) / 20.0, 0.0, 1.0)
    shape = _smoothstep(up) * (1.0 - _smoothstep(down))
    ripple = np.empty(minutes)  # stop-and-go: AR(1) at 1-minute steps, correlation time ~8 min
    ripple[0] = rng.normal()
    innovations = rng.normal(size=minutes) * np.sqrt(1.0 - 0.88**2)
    for k in range(1, minutes):
        ripple[k] = 0.88 * ripple[k - 1] + innovations[k]
    return shape * np.clip(1.0 + 0.15 * ripple, 0.6, 1.3)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    return x * x * (3.0 - 2.0 * x)


def congestion_keep(
    rng, network: RoadNetwork, events: list[CongestionEvent], num_steps: int, interval_minutes: int
) -> np.ndarray:
    """[T, N] share of free-flow speed left: min over events of (1 - drop_e,i(t)).

    drop_e,i(t) = severity_e * h_e(t - start_e - 60 d_i / c_e) * taper(d_i / R_e),
    d_i = road distance from sensor i downstream to the event's cell, taper = 1
    up to half the reach, then a smooth fade to 0 at the reach.
    """
    keep = np.ones((num_steps, len(network.sensor_ids)))
    step_minutes = np.arange(num_steps) * float(interval_minutes)
    for event in events:
        distance = network.sensor_to_cell_km[:, event.cell]
        affected = np.flatnonzero(distance < event.reach_km)
        if affected.size == 0:  # no sensor between the head and the queue's reach
            continue
        delay = 60.0 * distance[affected] / event.spread_kmh  # minutes for the wave to reach each sensor
        length = int(event.duration + 20.0 + delay.max()) + 2
        head = _head_intensity(rng, event.duration, length + 1)
        taper = 1.0 - _smoothstep(np.clip((distance[affected] / event.reach_km - 0.5) / 0.5, 0.0, 1.0))
        first = max(0, int(np.ceil(event.start / interval_minutes)))
        last = min(num_steps, int((event.start + length) / interval_minutes) + 1)
        if first >= last:
            continue
        tau = step_minutes[first:last, None] - event.start - delay[None, :]  # [t, affected]
        intensity = np.interp(tau, np.arange(len(head), dtype=np.float64), head, left=0.0, right=0.0)
        drop = np.clip(event.severity * intensity * taper[None, :], 0.0, 0.9)
        keep[first:last, affected] = np.minimum(keep[first:last, affected], 1.0 - drop)
    return keep


# ============================================================================ dropouts

def _dropout_mask(rng, num_steps: int, num_sensors: int, steps_per_hour: int) -> np.ndarray:
    """[T, N] bool, True = reading lost: isolated dropouts, whole-hour outages, rare multi-day outages."""
    lost = rng.random((num_steps, num_sensors)) < 0.004
    hours = max(1, num_steps // steps_per_hour)
    days = max(1, hours // 24)
    for n in range(num_sensors):
        for _ in range(rng.poisson(0.30 * days)):
            start = int(rng.integers(0, hours)) * steps_per_hour
            length = int(rng.choice([1, 1, 2, 2, 3, 4, 6, 8])) * steps_per_hour
            lost[start : start + length, n] = True
    for _ in range(rng.poisson(days / 14)):
        n = int(rng.integers(0, num_sensors))
        start = int(rng.integers(0, hours)) * steps_per_hour
        lost[start : start + int(rng.integers(24, 49)) * steps_per_hour, n] = True
    return lost


# ============================================================================ entry point

def make_synthetic(
    seed: int = 0,
    num_sensors: int = 64,
    days: int = 28,
    interval_minutes: int = 5,
    name: str = "synthetic",
) -> SensorDataset:
    """Generate the synthetic network's speeds (mph; 0 = missing) and graph from ``seed``.

    Returns a :class:`SensorDataset` of [days * 1440 / interval_minutes, num_sensors]
    readings with its Gaussian-kernel adjacency (see the module docstring).
    """
    for option, value, low in (("seed", seed, 0), ("num_sensors", num_sensors, 1), ("days", days, 1),
                               ("interval_minutes", interval_minutes, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{option}: expected an integer >= {low}, got {value!r}")
    if 1440 % interval_minutes != 0:
        raise ConfigError(f"interval_minutes: must divide a day (1440 minutes), got {interval_minutes}")
    # Independent streams per mechanism, so that e.g. `days` does not change the network.
    network_rng, recurrent_rng, incident_rng, ripple_rng, noise_rng, dropout_rng = (
        np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(int(seed)).spawn(6)
    )
    network = build_network(network_rng, int(num_sensors))
    start = pd.Timestamp(START_TIME)
    steps_per_day = 1440 // interval_minutes
    num_steps = days * steps_per_day
    num_nodes = len(network.sensor_ids)

    # Free flow with a mild speed-flow effect: up to 5 % slower at the day's peak demand.
    hours = (np.arange(steps_per_day) + 0.5) * interval_minutes / 60.0
    demand = np.empty((num_steps, num_nodes))
    sensor_system = network.system_of_cell[network.sensor_cell]
    for d in range(days):
        dow = (start.day_of_week + d) % 7
        for system in (0, 1):
            demand[d * steps_per_day : (d + 1) * steps_per_day, sensor_system == system] = (
                demand_profile(hours, dow, system)[:, None]
            )
    free = network.free_speed_mph[None, :] * (1.0 - 0.05 * np.clip(demand, 0.0, 1.2) ** 2)

    events = recurrent_events(recurrent_rng, network, days, start.day_of_week)
    events += incident_events(incident_rng, network, days)
    keep = congestion_keep(ripple_rng, network, events, num_steps, interval_minutes)

    bias = noise_rng.normal(0.0, 1.2, size=(1, num_nodes))
    speed = np.clip(free * np.maximum(keep, 1.0 - _MAX_DROP) + bias + noise_rng.normal(0.0, _NOISE_MPH, size=keep.shape), 3.0, 85.0)
    lost = _dropout_mask(dropout_rng, num_steps, num_nodes, max(1, 60 // interval_minutes))
    return SensorDataset(
        values=np.where(lost, 0.0, speed).astype(np.float32),
        mask=~lost,
        index=pd.date_range(start, periods=num_steps, freq=pd.Timedelta(minutes=interval_minutes)),
        sensor_ids=network.sensor_ids,
        adjacency=sensor_adjacency(network.distance_km),
        name=name,
        units="mph",
    )


def make_synthetic_network(seed: int = 0, num_sensors: int = 64) -> RoadNetwork:
    """The road network alone (cells, bottlenecks, sensors, road distances) for a seed."""
    network_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed)).spawn(6)[0]))
    return build_network(network_rng, int(num_sensors))
