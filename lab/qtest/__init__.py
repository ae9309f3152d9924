"""QEMU's qtest protocol, and a guest that is us: PCI enumeration and a modern virtio-pci
driver over it, and the VM launcher.

* :mod:`lab.qtest.client`: the qtest wire protocol (:class:`Qtest`, :func:`listen_unix`);
* :mod:`lab.qtest.pci`: configuration space, bus scan, BAR assignment;
* :mod:`lab.qtest.virtio_pci`: the virtio-pci driver (:class:`VirtioPci`), its guest-memory
  allocator; the layout it drives is :mod:`protocol.virtio_pci`;
* :mod:`lab.qtest.launcher`: :func:`qtest_vm`, QEMU started with a HLT BIOS and connected.

Usage::

    async with qtest_vm(qemu, devices=[...], chardevs={...}) as vm:
        dev = await VirtioPci.find(vm.qt, device_id)
        await dev.begin(features)                # reset, ACK, DRIVER, features, FEATURES_OK
        q = await dev.setup_queue(0, 64, GuestAllocator())  # a guest_driver.virtq.DriverQueue
        await dev.driver_ok()
"""
