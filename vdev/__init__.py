"""vballoon device side: the vhost-user back-end and its personalities."""
