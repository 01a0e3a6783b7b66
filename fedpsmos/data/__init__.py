"""Site data: synthetic sites, listing a site's cases, validation, split and manifest, previews.

Each site's files are read only by that site's rules (docs/design.md, "The pipeline and the privacy
boundary"); these modules never look at another site's folder.
"""

from fedpsmos.data.sources import CaseFiles, DataError

__all__ = ["CaseFiles", "DataError"]
