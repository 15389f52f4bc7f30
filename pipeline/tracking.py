"""One camera's detections → tracks, in the style of ByteTrack and BoT-SORT; pure, no I/O, no models.

:class:`Tracker` takes one frame at a time (boxes, optional ReID embeddings, the frame's time in
seconds) and returns one int64 track id per detection. Ids are unique within a tracker (a caller
prefixes them with the video key to make them global); every detection gets one.

Motion: each track carries a constant-velocity Kalman filter (as SORT / BoT-SORT) over the box
centre and size, ``(cx, cy, w, h)`` and their velocities, in pixels and pixels per **second**: the
prediction to a frame is made from the track's last update over the elapsed time ``dt``
(``x' = x + v·dt``; process noise grows with ``dt``), so sampled video with uneven gaps and lost
tracks need no per-frame bookkeeping: a prediction does not depend on how many frames went by
without the track. Noise is relative to the box size (BoT-SORT's choice), so one
setting fits near and far people.

Association of one frame (:meth:`Tracker.update`):

0. tracks not matched for more than ``max_age_s`` seconds are dropped;
1. **high-score detections** (``score >= high_score``) against all live tracks, matched or lost.
   Cost (BoT-SORT): ``min(1 - IoU, d_app)`` with IoU between the detection and the track's box
   predicted to this frame and ``d_app = (1 - cos) / 2`` between the detection's embedding and the
   track's EMA embedding; ``d_app`` only counts where the two are plausibly the same person:
   ``IoU >= proximity_iou`` and ``cos >= min_appearance_similarity`` (else it is 1). A pair may
   match when its cost is at most ``1 - match_iou``;
2. **low-score detections** (``low_score <= score < high_score``) against the tracks matched in
   the previous update and not in step 1, by IoU alone (their crops are often occluded: ByteTrack's
   second stage) and only at ``IoU >= low_match_iou``;
3. unmatched detections with ``score >= new_track_score`` open new tracks; any other detection
   gets a fresh id of its own and opens no track. ByteTrack opens tracks from high-score boxes
   only, as it drops the rest; here every box gets an id anyway, and a track opened by an unsure
   box groups a person the detector keeps finding at 0.1-0.5 (the default, ``new_track_score =
   low_score``: on the street clip 92% of boxes then continue a track of the previous frame,
   48% at 0.5). Such tracks also hold the odd steady false positive (a lamp post seen as a person
   in every frame), one id for all its boxes.

Each step is a Hungarian assignment (:func:`scipy.optimize.linear_sum_assignment`) that leaves a
pair unmatched rather than accept a cost above the limit (as ``lap.lapjv(cost_limit=...)`` in the
reference implementations). A matched track's Kalman filter is updated with the box; its
embedding EMA (``ema_momentum``, renormalised to unit length) starts and moves only with
high-score detections (low-score crops are often occluded), so a track opened by an unsure box
matches by IoU alone until a sure one joins it.

State: at most ``max_tracks`` live tracks (the least recently seen go first when more would be
kept). :meth:`Tracker.state` gives a JSON-able dict (config included) and
:meth:`Tracker.from_state` resumes from it; resuming gives the same ids as one pass (floats
round-trip exactly through JSON).

:func:`track_embedding`: one quality-weighted unit embedding per track for galleries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy.optimize import linear_sum_assignment

from reidx.pipeline.boxes import box_iou

STATE_VERSION = 1


@dataclass(frozen=True)
class TrackerConfig:
    """Gating and motion settings; defaults checked on 3 fps full-HD street video with YOLOX-Nano
    (input 640, detector threshold 0.1) and OSNet x0.25 MSMT17 features."""

    high_score: float = 0.5  # first-stage detections (ByteTrack's track_thresh; YOLOX-Nano scores people 0.5-0.9)
    low_score: float = 0.1  # below: never associated, a fresh id each (ByteTrack drops them)
    new_track_score: float = 0.1  # an unmatched detection this sure opens a track (module docstring, 3.)
    match_iou: float = 0.2  # first stage: 1 - IoU <= 0.8 (ByteTrack's match_thresh)
    low_match_iou: float = 0.5  # second stage, IoU only (ByteTrack's 0.5)
    # Appearance (BoT-SORT): counts only where the boxes overlap at least this much (BoT-SORT's
    # 0.5 is for 30 fps; at a few fps walkers move a third of their width between frames) ...
    proximity_iou: float = 0.25
    # ... and only above this cosine (same person in consecutive frames: 0.92-0.99 on the street
    # clip; different people: median 0.51, 95th percentile 0.66; BoT-SORT's 0.25 distance is 0.5).
    min_appearance_similarity: float = 0.75
    ema_momentum: float = 0.9  # track embedding = m * old + (1 - m) * new, renormalised (BoT-SORT)
    max_age_s: float = 2.0  # a track not matched for longer is dropped (ByteTrack: 30 frames at 30 fps = 1 s)
    max_tracks: int = 512  # live tracks kept at most (least recently seen dropped first)
    # Kalman noise, as fractions of the box size (w for x and w, h for y and h):
    measurement_std: float = 0.05  # detector box error (BoT-SORT: 1/20)
    position_std: float = 0.05  # position process noise per sqrt(second)
    velocity_std: float = 0.5  # velocity change per sqrt(second) (walking speed is ~0.8 heights/s)
    initial_velocity_std: float = 1.0  # an unknown velocity at a track's start, per second

    def __post_init__(self):
        if not 0 <= self.low_score <= self.high_score:
            raise ValueError("need 0 <= low_score <= high_score")
        for name in ("match_iou", "low_match_iou", "proximity_iou", "ema_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.max_age_s < 0 or self.max_tracks < 1:
            raise ValueError("max_age_s must be >= 0 and max_tracks >= 1")


def _to_cxcywh(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = np.asarray(box[:4], np.float64)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, 1.0), max(y2 - y1, 1.0)])


def _to_xyxy(z: np.ndarray) -> np.ndarray:
    cx, cy, w, h = z[..., 0], z[..., 1], np.maximum(z[..., 2], 1.0), np.maximum(z[..., 3], 1.0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def _assign(cost: np.ndarray, limit: float) -> list[tuple[int, int]]:
    """Minimum-cost matching where a pair is only taken when its cost is at most ``limit``.

    Every row and column may stay unmatched at ``limit / 2`` each (what ``lapjv(cost_limit)`` does):
    a pair then beats leaving both unmatched exactly when its cost is below ``limit``.
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        return []
    ext = np.zeros((n + m, n + m))
    ext[:n, :m] = np.where(cost <= limit, cost, 2 * limit + 1)  # forbidden: dearer than both unmatched
    ext[:n, m:] = ext[n:, :m] = limit / 2
    rows, cols = linear_sum_assignment(ext)
    return [(r, c) for r, c in zip(rows, cols) if r < n and c < m and cost[r, c] <= limit]


class _Track:
    """One live track: Kalman posterior at its last update (``last_time``), EMA embedding or None."""

    __slots__ = ("id", "mean", "cov", "embedding", "last_time")

    def __init__(self, id: int, mean, cov, embedding, last_time: float):
        self.id = int(id)
        self.mean = np.asarray(mean, np.float64).reshape(8)
        self.cov = np.asarray(cov, np.float64).reshape(8, 8)
        self.embedding = None if embedding is None else np.asarray(embedding, np.float64)
        self.last_time = float(last_time)

    def to_dict(self) -> dict:
        return {"id": self.id, "mean": self.mean.tolist(), "cov": self.cov.tolist(),
                "embedding": None if self.embedding is None else self.embedding.tolist(),
                "last_time": self.last_time}


class Tracker:
    """Links one camera's detections into tracks; see the module docstring for the rule."""

    def __init__(self, config: TrackerConfig = TrackerConfig()):
        self.config = config
        self.tracks: list[_Track] = []
        self.next_id = 0
        self.last_time: float | None = None

    # --- Kalman filter: state (cx, cy, w, h, vcx, vcy, vw, vh), velocities per second ---------

    def _scale(self, mean: np.ndarray) -> np.ndarray:
        w, h = max(mean[2], 1.0), max(mean[3], 1.0)
        return np.array([w, h, w, h])

    def _predict(self, track: _Track, time_s: float) -> tuple[np.ndarray, np.ndarray]:
        dt = max(time_s - track.last_time, 0.0)
        if dt == 0:
            return track.mean, track.cov
        f = np.eye(8)
        f[:4, 4:] = dt * np.eye(4)
        s = self._scale(track.mean)
        q = np.diag(np.concatenate([(self.config.position_std * s) ** 2, (self.config.velocity_std * s) ** 2]) * dt)
        return f @ track.mean, f @ track.cov @ f.T + q

    def _correct(self, mean, cov, box) -> tuple[np.ndarray, np.ndarray]:
        z = _to_cxcywh(box)
        r = np.diag((self.config.measurement_std * self._scale(mean)) ** 2)
        s = cov[:4, :4] + r
        gain = np.linalg.solve(s, cov[:4, :]).T  # cov H' S^-1, with H = [I 0] and S symmetric
        mean = mean + gain @ (z - mean[:4])
        cov = cov - gain @ cov[:4, :]
        return mean, (cov + cov.T) / 2

    def _new_track(self, box, embedding, time_s: float) -> _Track:
        z = _to_cxcywh(box)
        s = np.array([z[2], z[3], z[2], z[3]])
        c = self.config
        cov = np.diag(np.concatenate([(2 * c.measurement_std * s) ** 2, (c.initial_velocity_std * s) ** 2]))
        track = _Track(self.next_id, np.concatenate([z, np.zeros(4)]), cov, embedding, time_s)
        self.next_id += 1
        return track

    # --- association --------------------------------------------------------------------------

    def update(self, boxes: np.ndarray, embeddings: np.ndarray | None, frame_time_s: float) -> np.ndarray:
        """Boxes (K, 5) x1, y1, x2, y2, score of one frame, their unit embeddings (K, D) or None,
        the frame's time in seconds (not decreasing) → track id per detection, int64 (K,)."""
        c = self.config
        boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
        k = len(boxes)
        if embeddings is not None:
            embeddings = np.asarray(embeddings, np.float64)
            if embeddings.ndim != 2 or len(embeddings) != k:
                raise ValueError(f"embeddings must be (K, D) with K = {k}, not {embeddings.shape}")
        frame_time_s = float(frame_time_s)
        if self.last_time is not None and frame_time_s < self.last_time:
            raise ValueError(f"frame time {frame_time_s} s is before the previous frame's {self.last_time} s")
        previous_time = self.last_time
        self.last_time = frame_time_s

        # 0. expire, predict
        self.tracks = [t for t in self.tracks if frame_time_s - t.last_time <= c.max_age_s]
        predicted = [self._predict(t, frame_time_s) for t in self.tracks]
        track_boxes = _to_xyxy(np.array([m[:4] for m, _ in predicted])) if predicted else np.zeros((0, 4))
        iou = box_iou(track_boxes, boxes)  # (T, K)

        scores = boxes[:, 4]
        high = np.flatnonzero(scores >= c.high_score)
        low = np.flatnonzero((scores >= c.low_score) & (scores < c.high_score))
        matches: dict[int, int] = {}  # detection → track index

        # 1. high-score detections against all live tracks: IoU, or appearance where plausible
        cost = 1.0 - iou[:, high]
        if embeddings is not None and len(high):
            with_emb = [i for i, t in enumerate(self.tracks) if t.embedding is not None]
            if with_emb:
                cos = np.stack([self.tracks[i].embedding for i in with_emb]) @ embeddings[high].T
                d_app = (1.0 - cos) / 2
                plausible = (iou[with_emb][:, high] >= c.proximity_iou) & (cos >= c.min_appearance_similarity)
                cost[with_emb] = np.minimum(cost[with_emb], np.where(plausible, d_app, 1.0))
        for ti, j in _assign(cost, 1.0 - c.match_iou):
            matches[int(high[j])] = ti

        # 2. low-score detections against tracks seen in the previous frame and free, IoU only
        taken = set(matches.values())
        free = [i for i, t in enumerate(self.tracks)
                if i not in taken and previous_time is not None and t.last_time == previous_time]
        if free and len(low):
            for fi, j in _assign(1.0 - iou[np.ix_(free, low)], 1.0 - c.low_match_iou):
                matches[int(low[j])] = free[fi]

        # update matched tracks
        ids = np.empty(k, np.int64)
        for j, ti in matches.items():
            track = self.tracks[ti]
            track.mean, track.cov = self._correct(*predicted[ti], boxes[j])
            track.last_time = frame_time_s
            if embeddings is not None and scores[j] >= c.high_score:
                track.embedding = self._ema(track.embedding, embeddings[j])
            ids[j] = track.id

        # 3. new tracks, or a one-off id
        for j in range(k):
            if j in matches:
                continue
            if scores[j] >= c.new_track_score and scores[j] >= c.low_score:
                sure = embeddings is not None and scores[j] >= c.high_score  # appearance from sure boxes only
                embedding = self._ema(None, embeddings[j]) if sure else None
                track = self._new_track(boxes[j], embedding, frame_time_s)
                self.tracks.append(track)
                ids[j] = track.id
            else:
                ids[j] = self.next_id
                self.next_id += 1

        if len(self.tracks) > c.max_tracks:  # keep the most recently seen (newest ids on ties)
            self.tracks.sort(key=lambda t: (t.last_time, t.id), reverse=True)
            self.tracks = sorted(self.tracks[:c.max_tracks], key=lambda t: t.id)
        return ids

    def _ema(self, old: np.ndarray | None, new: np.ndarray) -> np.ndarray:
        m = self.config.ema_momentum
        v = new if old is None else m * old + (1 - m) * new
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    # --- state --------------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything needed to resume, as a JSON-able dict (lists of floats, config included)."""
        return {"version": STATE_VERSION, "config": asdict(self.config), "next_id": self.next_id,
                "last_time": self.last_time, "tracks": [t.to_dict() for t in self.tracks]}

    @classmethod
    def from_state(cls, state: dict, config: TrackerConfig | None = None) -> "Tracker":
        """A tracker resuming from :meth:`state` (the saved config unless ``config`` is given)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"tracker state version {state.get('version')!r}, expected {STATE_VERSION}")
        if config is None:
            known = {f.name for f in fields(TrackerConfig)}
            config = TrackerConfig(**{k: v for k, v in state["config"].items() if k in known})
        tracker = cls(config)
        tracker.next_id = int(state["next_id"])
        tracker.last_time = None if state["last_time"] is None else float(state["last_time"])
        tracker.tracks = [_Track(**t) for t in state["tracks"]]
        return tracker

    def __len__(self) -> int:
        """Live tracks."""
        return len(self.tracks)


def track_embedding(embeddings: np.ndarray, scores: np.ndarray, boxes: np.ndarray,
                    full_height: float = 256.0) -> np.ndarray:
    """One unit embedding for a track: the mean of its detections' embeddings weighted by quality.

    Weight of a detection = its score × ``min(1, box height / full_height)``: a surer and larger
    crop gives a better feature, up to the embedder's input height (256 for OSNet; taller crops are
    downscaled to it, so they carry no more detail). ``boxes``: (N, >=4) x1, y1, x2, y2. The
    weighted mean is renormalised to unit length; all-zero weights fall back to the plain mean.
    """
    embeddings = np.asarray(embeddings, np.float64)
    scores = np.asarray(scores, np.float64).reshape(-1)
    boxes = np.asarray(boxes, np.float64).reshape(len(embeddings), -1)
    if len(embeddings) == 0 or len(scores) != len(embeddings):
        raise ValueError("need N >= 1 embeddings with one score and one box each")
    heights = np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    weights = np.clip(scores, 0, None) * np.minimum(1.0, heights / full_height)
    if weights.sum() <= 0:
        weights = np.ones(len(embeddings))
    mean = weights @ embeddings
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)
