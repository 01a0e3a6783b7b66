"""The site manifest, ``results/data/{site}/manifest.json``: one typed wrapper that every stage reads.

Written once per site by :func:`fedpsmos.data.validation.build_manifest` (rule ``validate_site``) and read by
preprocessing, the fingerprint, the patch index, training, federated rounds, prediction, evaluation and the
previews. The format is docs/architecture.md "Manifest"::

    {"site", "source", "root", "labels", "background", "ignore", "organs",
     "cases": [{"case", "image", "label", "split", "sitk_size", "sitk_spacing", "sitk_origin",
                "sitk_direction", "label_values"}],
     "train": [...], "validation": [...], "test": [...]}

Like nnU-Net v2's ``PlansManager`` over ``plans.json``, :class:`Manifest` gives properties instead of raw
keys, so no stage parses the JSON itself. Loading checks the file is a JSON object whose keys have their
types (strings, lists of case ids, case entries with a unique ``case`` id; the three splits disjoint) and a
key a stage needs but the file lacks raises when that stage asks for it: a stage depends only on what it
reads. Every problem raises one :class:`ManifestError` naming the file. :meth:`Manifest.write` checks the
full format before writing, so a manifest the workflow wrote always has every key.

Image and label paths are recorded as the site's folder listed them; :meth:`CaseRecord.image` and
:meth:`CaseRecord.label` resolve a relative one against the current folder, then the manifest's ``root``,
then the manifest's own folder, so a manifest moved together with its data (or written by hand with
paths relative to it) still finds its files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpsmos.atomic import write_json
from fedpsmos.data.label_map import LabelMap
from fedpsmos.organs import LabelMapError

SPLITS = ("train", "validation", "test")
_TEXT_KEYS = ("site", "source", "root")
# The keys build_manifest writes; a manifest must have them all to be written.
REQUIRED_KEYS = ("site", "source", "root", "labels", "organs", "cases", *SPLITS)


class ManifestError(ValueError):
    """A site manifest is missing, unreadable or malformed; the message is ``"{path}: {problem}"``."""


@dataclass(frozen=True)
class CaseRecord:
    """One entry of a manifest's ``cases``: the case id, its split, its files and the raw entry.

    ``image`` and ``label`` resolve the recorded paths (module docstring); ``entry`` is the entry as
    written (geometry ``sitk_*`` and ``label_values`` for manifests of ``validate_site``).
    """

    case: str
    split: str | None
    entry: Mapping[str, Any] = field(repr=False)
    manifest: Manifest = field(repr=False, compare=False)

    @property
    def image(self) -> Path:
        """The case's CT image file."""
        return self.manifest.resolve(self._recorded("image"), what=f"case {self.case} image")

    @property
    def label(self) -> Path:
        """The case's label file."""
        return self.manifest.resolve(self._recorded("label"), what=f"case {self.case} label")

    def _recorded(self, key: str) -> str:
        value = self.entry.get(key)
        if not isinstance(value, str) or not value:
            raise ManifestError(f"{self.manifest.where}: case {self.case!r} has no {key!r} path")
        return value


class Manifest:
    """A site manifest: its data, checked on construction, and where it came from.

    Parameters
    ----------
    data:
        The manifest's JSON object.
    path:
        The file it was read from (or will be written to); named in errors and used to resolve relative
        case paths. ``None`` for a manifest that is not on disk yet.
    """

    def __init__(self, data: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._data = dict(data)
        self._check_types()
        self._cases = {str(e["case"]): e for e in self._data.get("cases", [])}

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, site: str | None = None) -> Manifest:
        """Read and check a manifest file.

        Parameters
        ----------
        path:
            ``results/data/{site}/manifest.json``.
        site:
            When given, the manifest must be this site's (a rule handed another site's file otherwise).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{path}: manifest file not found (run rule validate_site)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(f"{path}: cannot read the manifest ({err})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: a manifest is a JSON object, got {type(data).__name__}")
        manifest = cls(data, path)
        if site is not None and manifest.site != site:
            raise ManifestError(f"{path}: manifest of site {manifest.site!r}, expected {site!r}")
        return manifest

    # ------------------------------------------------------------------ checks

    @property
    def where(self) -> str:
        """The manifest's file, or a placeholder before it is written, for messages."""
        return str(self.path) if self.path is not None else "manifest"

    def _fail(self, problem: str) -> ManifestError:
        return ManifestError(f"{self.where}: {problem}")

    def _check_types(self) -> None:
        data = self._data
        for key in _TEXT_KEYS:
            if key in data and not isinstance(data[key], str):
                raise self._fail(f"{key!r} must be a string, got {data[key]!r}")
        for key in (*SPLITS, "organs"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self._fail(f"{key!r} must be a list of names, got {value!r}")
            if len(set(value)) != len(value):
                raise self._fail(f"{key!r} lists a name twice")
        for a, b in ((0, 1), (0, 2), (1, 2)):
            both = sorted(set(data.get(SPLITS[a], [])) & set(data.get(SPLITS[b], [])))
            if both:
                raise self._fail(f"cases {both} are in both {SPLITS[a]} and {SPLITS[b]}")
        cases = data.get("cases", [])
        if not isinstance(cases, list):
            raise self._fail(f"'cases' must be a list of case entries, got {type(cases).__name__}")
        seen: set[str] = set()
        for entry in cases:
            if not isinstance(entry, dict) or not isinstance(entry.get("case"), str):
                raise self._fail(f"every entry of 'cases' needs a 'case' id, got {entry!r}")
            if entry["case"] in seen:
                raise self._fail(f"case {entry['case']!r} appears twice in 'cases'")
            seen.add(entry["case"])
        if "labels" in data and not isinstance(data["labels"], dict):
            raise self._fail(f"'labels' must be a map {{organ: [values]}}, got {data['labels']!r}")

    def _required(self, key: str) -> Any:
        if key not in self._data:
            raise self._fail(f"the manifest has no {key!r} (re-run rule validate_site)")
        return self._data[key]

    # ------------------------------------------------------------------ properties

    @property
    def site(self) -> str:
        """The site the manifest describes."""
        return str(self._required("site"))

    @property
    def source(self) -> str:
        """How the site's folder is laid out: ``synthetic``, ``nnunet``, ``msd`` or ``files``."""
        return str(self._required("source"))

    @property
    def root(self) -> Path | None:
        """The site's raw folder, ``None`` when the manifest does not record one."""
        root = self._data.get("root")
        return Path(root) if root else None

    @property
    def train(self) -> tuple[str, ...]:
        """Training case ids, in manifest order."""
        return tuple(self._required("train"))

    @property
    def validation(self) -> tuple[str, ...]:
        """Local validation case ids (empty when validation is off or the manifest predates it)."""
        return tuple(self._data.get("validation", []))

    @property
    def test(self) -> tuple[str, ...]:
        """Test case ids, in manifest order."""
        return tuple(self._required("test"))

    @property
    def label_map(self) -> LabelMap:
        """The site's resolved label map (``labels``, ``background``, ``ignore``)."""
        try:
            return LabelMap.from_manifest(self._data)
        except LabelMapError as err:
            raise self._fail(str(err)) from None

    @property
    def organs(self) -> tuple[str, ...]:
        """The global organs the site labels (``organs``, else those of its label map)."""
        if self._data.get("organs"):
            return tuple(self._data["organs"])
        return self.label_map.organs

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Every case id of ``cases``, in manifest order."""
        return tuple(self._cases)

    @property
    def cases(self) -> tuple[CaseRecord, ...]:
        """Every case entry, in manifest order."""
        return tuple(self.case(c) for c in self._cases)

    def case(self, case: str) -> CaseRecord:
        """The entry of one case.

        Parameters
        ----------
        case:
            Case id; one the manifest does not list raises :class:`ManifestError`.
        """
        entry = self._cases.get(str(case))
        if entry is None:
            raise self._fail(f"case {case!r} is not in the manifest's cases")
        split = entry.get("split")
        return CaseRecord(
            case=str(case), split=None if split is None else str(split), entry=entry, manifest=self
        )

    def records(self, names: Sequence[str]) -> tuple[CaseRecord, ...]:
        """The entries of some case ids (e.g. :attr:`train` + :attr:`validation`), in the order given.

        Parameters
        ----------
        names:
            Case ids, each listed in ``cases``.
        """
        return tuple(self.case(c) for c in names)

    def resolve(self, recorded: str, *, what: str = "file") -> Path:
        """A path the manifest records: as written, else under ``root``, else beside the manifest.

        Parameters
        ----------
        recorded:
            The path as written in the manifest.
        what:
            What it is, for the message when no candidate exists.
        """
        candidates = [Path(recorded)]
        if not candidates[0].is_absolute():
            if self.root is not None:
                candidates.append(self.root / recorded)
            if self.path is not None:
                candidates.append(self.path.parent / recorded)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise self._fail(f"{what} {recorded!r} not found (tried {[str(c) for c in candidates]})")

    # ------------------------------------------------------------------ writing

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON object (a copy)."""
        return json.loads(json.dumps(self._data))

    def check_complete(self) -> None:
        """Raise :class:`ManifestError` unless every key of the format is there and the splits cover
        exactly the cases, each entry naming the split it is in (docs/architecture.md "Manifest")."""
        missing = [k for k in REQUIRED_KEYS if k not in self._data]
        if missing:
            raise self._fail(f"the manifest lacks {missing}")
        self.label_map  # noqa: B018  (raises on a bad label map)
        listed = [c for split in SPLITS for c in self._data[split]]
        if sorted(listed) != sorted(self._cases):
            raise self._fail("train, validation and test must together list every case exactly once")
        for split in SPLITS:
            for case in self._data[split]:
                record = self.case(case)
                if record.split != split:
                    raise self._fail(f"case {case!r} is in {split} but its entry says {record.split!r}")
                for key in ("image", "label"):
                    record._recorded(key)

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Check the manifest is complete (:meth:`check_complete`) and write it atomically.

        Parameters
        ----------
        path:
            Where to write it; default: the path it was made with.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ManifestError("manifest: no path to write it to")
        self.path = target
        self.check_complete()
        write_json(target, self._data)
        return target
