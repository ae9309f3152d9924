"""Units every layer shares: the page.

vballoon's pages are 4 KiB everywhere: vmmemctl PPNs, virtio-balloon PFNs (``VIRTIO_BALLOON_PFN_SHIFT``),
vhost-user region offsets, the policy's page counts. Size parsing (``parse_size``) lives here too.
"""

from __future__ import annotations

#: log2 of the page size.
PAGE_SHIFT = 12
#: The page, in bytes (4 KiB).
PAGE_SIZE = 1 << PAGE_SHIFT
#: Pages in a MiB (256).
PAGES_PER_MIB = (1 << 20) // PAGE_SIZE
