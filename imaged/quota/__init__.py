"""Per-container quotas below the drivers: loop-backed ext4 (with its pure size model) and the
filesystem's project quotas. Built on ``imaged.host``; never imports the store or anything above.
"""
