-- The product catalogue: small and read-mostly. Every process holds it in memory and
-- reloads it when this trigger's NOTIFY arrives.
CREATE TABLE products (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text          NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    price       numeric(12,2) NOT NULL CHECK (price >= 0),
    category    text          NOT NULL CHECK (char_length(category) BETWEEN 1 AND 100),
    created_at  timestamptz   NOT NULL DEFAULT now(),
    updated_at  timestamptz   NOT NULL DEFAULT now()
);

INSERT INTO products (name, price, category) VALUES
    ('Mechanical keyboard',      89.90, 'peripherals'),
    ('Wireless mouse',           24.50, 'peripherals'),
    ('27" monitor',             229.00, 'displays'),
    ('USB-C dock',              119.00, 'accessories'),
    ('Noise-cancelling headset', 149.99, 'audio'),
    ('Webcam 1080p',             49.00, 'video'),
    ('Laptop stand',             34.95, 'accessories'),
    ('Desk lamp',                27.80, 'furniture');

CREATE FUNCTION products_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hotpath_products', TG_OP);
    RETURN NULL;
END
$$;

CREATE TRIGGER products_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION products_notify();
