"""The two personalities of the device: vmw (vmmemctl) and virtio-balloon."""
