"""OPC UA driver (asyncua): config, values, security, driver. See README.md here."""
