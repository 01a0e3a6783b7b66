"""Path templates of the ``files`` data source: a data set read in the folder layout it is downloaded in.

A site's ``files`` mapping names its images and labels by templates relative to the site's folder, such as
``img/img{case}.nii.gz`` (BTCV), ``case_{case}/segmentation.nii.gz`` (KiTS19) or
``*/segmentation-{case}.nii`` (LiTS, whose training files sit in two batch folders). Rules:

- exactly one ``{case}`` field, in the file name or in a folder name; the case id is the text it matches;
- a ``*`` in a folder name matches any text within that one folder level (never in the file name);
- the name ends in one of :data:`FILE_ENDINGS` (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``);
- no absolute path, no ``.``/``..`` parts, no other ``{...}`` field.

Dotfiles (``._*`` resource forks of macOS archives) never match a ``{case}`` or ``*`` part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
CASE = "{case}"
# Case ids become file names of the workflow (common.smk's `case` wildcard constraint).
CASE_ID = re.compile(r"[A-Za-z0-9_.\-]+")


class TemplateError(ValueError):
    """A ``files`` template is malformed; the message names the template and the problem."""


@dataclass(frozen=True)
class Match:
    """One file a template matched: its path and the case id its ``{case}`` field matched."""

    case: str
    path: Path


def _part_pattern(part: str, case: str | None) -> re.Pattern[str]:
    pieces = []
    for piece in re.split(r"(\{case\}|\*)", part):
        if piece == CASE:
            pieces.append(re.escape(case) if case is not None else r"(?P<case>.+)")
        elif piece == "*":
            pieces.append(r".*")
        else:
            pieces.append(re.escape(piece))
    return re.compile("".join(pieces))


@dataclass(frozen=True)
class FileTemplate:
    """A parsed path template (see the module docstring).

    Parameters
    ----------
    text:
        The template as configured, e.g. ``"*/volume-{case}.nii"``.
    """

    text: str

    def __post_init__(self) -> None:
        text = self.text
        if not isinstance(text, str) or not text:
            raise TemplateError(f"template {text!r} must be a non-empty path")
        if text.startswith("/") or "\\" in text:
            raise TemplateError(f"template {text!r} must be a path relative to the site folder, with '/'")
        parts = text.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise TemplateError(f"template {text!r} has an empty, '.' or '..' folder")
        if text.count(CASE) != 1:
            raise TemplateError(f"template {text!r} must hold the {CASE} field exactly once")
        if "{" in text.replace(CASE, "") or "}" in text.replace(CASE, ""):
            raise TemplateError(f"template {text!r} has a field other than {CASE}")
        if "*" in parts[-1]:
            raise TemplateError(f"template {text!r}: '*' is allowed in folder names only, not the file name")
        if not any(parts[-1].endswith(e) for e in FILE_ENDINGS):
            raise TemplateError(f"template {text!r} must end in one of {', '.join(FILE_ENDINGS)}")

    @property
    def parts(self) -> list[str]:
        return self.text.split("/")

    def fill(self, case: str) -> str:
        """The template with ``{case}`` replaced (``*`` kept), for messages."""
        return self.text.replace(CASE, case)

    def find(self, root: Path, case: str | None = None) -> list[Match]:
        """The visible files under ``root`` the template matches, in sorted path order.

        Parameters
        ----------
        root:
            The site folder.
        case:
            Only this case's files; ``None`` for every case.
        """
        found = [Match(case or "", root)]
        parts = self.parts
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            step: list[Match] = []
            for match in found:
                if "*" not in part and (CASE not in part or case is not None):
                    path = match.path / (part.replace(CASE, case) if case is not None else part)
                    if path.is_file() if last else path.is_dir():
                        step.append(Match(match.case, path))
                    continue
                if not match.path.is_dir():
                    continue
                pattern = _part_pattern(part, case)
                for entry in sorted(match.path.iterdir()):
                    hit = None if entry.name.startswith(".") else pattern.fullmatch(entry.name)
                    if hit is None or not (entry.is_file() if last else entry.is_dir()):
                        continue
                    step.append(Match(hit.groupdict().get("case") or match.case, entry))
            found = step
        return found


def parse_files(files: object, *, site: str) -> tuple[FileTemplate, FileTemplate]:
    """The (images, labels) templates of a site's ``files`` mapping.

    Raises :class:`TemplateError` naming the site and key for a missing or malformed template.
    """
    if not isinstance(files, Mapping) or set(files) != {"images", "labels"}:
        got = sorted(files) if isinstance(files, Mapping) else files
        raise TemplateError(f"site {site}: files must map exactly images and labels to templates, got {got}")
    templates = []
    for key in ("images", "labels"):
        try:
            templates.append(FileTemplate(files[key]))
        except TemplateError as err:
            raise TemplateError(f"site {site}: files.{key}: {err}") from None
    if templates[0].text == templates[1].text:
        raise TemplateError(f"site {site}: files.images and files.labels are the same template")
    return templates[0], templates[1]
