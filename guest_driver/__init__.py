"""The guest side: driver core, transports, our vhost-user front-end."""
