"""Person labels from file names: the one parser of Market-1501 naming, and the label rules.

Market-1501 naming (also CUHK03 and Con-ReID as laid out here): ``PPPP_cC…`` — ``0001_c1s1_001051_00.jpg``
is person ``1`` seen by camera ``"1"``. Rules shared by evaluation, queries and training:

- ``person_id`` is an int64; ``-1`` marks junk (left out of galleries), ``0`` distractors;
  ids ≤ 0 count as unlabelled for training.
- ``camera`` is a **string** everywhere (shards, embedded-crops tables, query results): manifests
  name cameras freely (``"gate-3"``), and a camera is compared, never added.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

JUNK = -1
# searched in a POSIX path: the name may sit in a folder (archive members, query paths)
MARKET_PERSON = re.compile(r"(?:^|/)(-?\d+)_c\d+")
MARKET_CAMERA = re.compile(r"(?:^|/)-?\d+_c(\d+)")


def parse_market_name(name: str) -> tuple[int, str] | None:
    """``0001_c1s1_001051_00.jpg`` → ``(1, "1")``; None when the file name does not follow the convention."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    person, camera = MARKET_PERSON.search(base), MARKET_CAMERA.search(base)
    if person is None or camera is None:
        return None
    return int(person.group(1)), camera.group(1)
