"""PLC simulators of a production line (Modbus and OPC UA) over a shared line model."""
